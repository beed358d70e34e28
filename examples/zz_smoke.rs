use model_tracer::reference::model::Llama;
use model_tracer::reference::tokenizer::ChatMessage;
use model_tracer::Disabled;
fn main() {
    let mut m = Llama::from_gguf("models/SmolLM2-135M-Instruct.Q4_1.gguf", None, Disabled).unwrap();
    let tok = m.tokenizer.clone().unwrap();
    let p = tok.apply_chat_template(&[ChatMessage::user("What is the capital of France?")], true).unwrap();
    println!("{p:?}");
    let ids = tok.encode(&p);
    println!("{ids:?}");
    let g = m.generate(&ids, 30, |_| {});
    println!("{:?}", tok.decode(&g.tokens));
    let mut logits = Vec::new();
    m.set_exact(std::env::var("EXACT").is_ok());
    for &t in &ids { logits = m.forward(t).to_vec(); }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    for &i in &idx[..5] { println!("{i} {:?} {}", tok.token_str(i as u32), logits[i]); }
    std::fs::write("/tmp/smoke/ids.txt", format!("{ids:?}")).unwrap();
}
