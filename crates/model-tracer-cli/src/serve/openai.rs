//! The OpenAI API's shapes: requests read from untrusted JSON into checked
//! values (every mistake an [`ApiError`] naming the parameter), responses
//! and stream chunks written, and the error object.

use serde_json::{json, Map, Value};

use model_tracer_llama::tokenizer::{ChatMessage, Tokenizer};

use super::engine::Level;
use super::sampling::Sampling;

/// Stop strings a request may give, as in the OpenAI API.
pub const MAX_STOPS: usize = 4;

/// An error answered to a client: the HTTP status and OpenAI's error
/// object, `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, for a person.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about parameter `param`.
    pub fn invalid(param: &str, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: Some(code),
        }
    }

    /// An error of `status` about no one parameter.
    pub fn new(
        status: u16,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: Some(code),
        }
    }

    /// The error object.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

/// A checked request, ready for the model.
#[derive(Debug, Clone)]
pub struct Request {
    /// The prompt's token ids (the chat rendered with the template).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// How to choose them.
    pub sampling: Sampling,
    /// Where the text ends.
    pub stop: Vec<String>,
    /// Server-sent events instead of one response.
    pub stream: bool,
    /// A last chunk with the usage, when streaming.
    pub include_usage: bool,
    /// The trace level asked for, if one was.
    pub level: Option<Level>,
}

/// What a request is checked against.
pub struct Limits<'a> {
    /// The model's tokenizer (a synthetic model has none: text bytes are
    /// token ids).
    pub tokenizer: Option<&'a Tokenizer>,
    /// Positions a sequence may hold: prompt plus generated tokens.
    pub context: usize,
    /// The seed of a request that gives none.
    pub default_seed: u64,
}

/// Reads the body of a request to `endpoint`.
pub fn parse_request(
    endpoint: Endpoint,
    body: &[u8],
    limits: &Limits<'_>,
) -> Result<Request, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::new(
            400,
            "invalid_request_error",
            "invalid_utf8",
            format!("the body is not UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        ApiError::new(
            400,
            "invalid_request_error",
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(ApiError::new(
            400,
            "invalid_request_error",
            "invalid_json",
            "the body must be a JSON object",
        ));
    };
    let prompt = match endpoint {
        Endpoint::Chat => {
            let messages = chat_messages(obj.get("messages"))?;
            render_chat(&messages, limits.tokenizer)?
        }
        Endpoint::Completions => {
            let prompt = completion_prompt(obj.get("prompt"))?;
            encode(&prompt, limits.tokenizer)
        }
    };
    let param = if endpoint == Endpoint::Chat {
        "messages"
    } else {
        "prompt"
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            param,
            "invalid_value",
            "the prompt encodes to no tokens",
        ));
    }
    if prompt.len() >= limits.context {
        return Err(ApiError::invalid(
            param,
            "context_length_exceeded",
            format!(
                "the prompt is {} tokens; this server's context holds {} positions, \
                 the prompt and at least one generated token",
                prompt.len(),
                limits.context
            ),
        ));
    }
    let room = limits.context - prompt.len();
    let max_tokens = match optional_uint(&obj, "max_completion_tokens")?
        .or(optional_uint(&obj, "max_tokens")?)
    {
        None => room,
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "invalid_value",
                "max_tokens must be at least 1",
            ))
        }
        Some(n) if n > room as u64 => {
            return Err(ApiError::invalid(
                "max_tokens",
                "context_length_exceeded",
                format!(
                    "the prompt ({} tokens) and max_tokens {n} need {} positions; this \
                     server's context holds {}",
                    prompt.len(),
                    prompt.len() as u64 + n,
                    limits.context
                ),
            ))
        }
        Some(n) => n as usize,
    };
    let temperature = optional_number(&obj, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            "invalid_value",
            "temperature must be between 0 and 2",
        ));
    }
    let top_p = optional_number(&obj, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            "invalid_value",
            "top_p must be greater than 0 and at most 1",
        ));
    }
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => limits.default_seed,
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => return Err(type_error("seed", "an integer")),
        },
        Some(_) => return Err(type_error("seed", "an integer")),
    };
    match optional_uint(&obj, "n")? {
        None | Some(1) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "n",
                "invalid_value",
                "this server generates one choice per request (n = 1)",
            ))
        }
    }
    let stop = stop_strings(obj.get("stop"))?;
    let stream = optional_bool(&obj, "stream")?.unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(type_error("stream_options.include_usage", "a boolean")),
        },
        Some(_) => return Err(type_error("stream_options", "an object")),
    };
    if let Some(m) = obj.get("model") {
        if !m.is_string() && !m.is_null() {
            return Err(type_error("model", "a string"));
        }
    }
    let level = trace_level(obj.get("model_trace"))?;
    Ok(Request {
        prompt,
        max_tokens,
        sampling: Sampling {
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed,
        },
        stop,
        stream,
        include_usage,
        level,
    })
}

fn type_error(param: &str, what: &str) -> ApiError {
    ApiError::invalid(param, "invalid_type", format!("{param} must be {what}"))
}

fn optional_uint(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v)),
            None if n.as_i64().is_some() => Err(ApiError::invalid(
                key,
                "invalid_value",
                format!("{key} must not be negative"),
            )),
            None => Err(type_error(key, "an integer")),
        },
        Some(_) => Err(type_error(key, "an integer")),
    }
}

fn optional_number(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| type_error(key, "a number")),
        Some(_) => Err(type_error(key, "a number")),
    }
}

fn optional_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(type_error(key, "a boolean")),
    }
}

/// The chat's messages: a non-empty list of `{role, content}` with a
/// known role and text content (a string, or a list of text parts).
fn chat_messages(value: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let list = match value {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "messages",
                "missing_required_parameter",
                "messages is required",
            ))
        }
        Some(Value::Array(list)) => list,
        Some(_) => return Err(type_error("messages", "a list of messages")),
    };
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "invalid_value",
            "messages must hold at least one message",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |field: &str| format!("messages[{i}].{field}");
            let Value::Object(m) = m else {
                return Err(type_error(&format!("messages[{i}]"), "an object"));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) => r.as_str(),
                None | Some(Value::Null) => {
                    return Err(ApiError::invalid(
                        &at("role"),
                        "missing_required_parameter",
                        format!("{} is required", at("role")),
                    ))
                }
                Some(_) => return Err(type_error(&at("role"), "a string")),
            };
            let role = match role {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                other => {
                    return Err(ApiError::invalid(
                        &at("role"),
                        "invalid_value",
                        format!(
                            "unknown role {other:?} (system, developer, user, assistant or tool)"
                        ),
                    ))
                }
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type"), p.get("text")) {
                            (Some(Value::String(t)), Some(Value::String(s))) if t == "text" => {
                                text.push_str(s)
                            }
                            _ => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content[{j}]"),
                                    "invalid_value",
                                    "content parts must be {\"type\": \"text\", \"text\": ...}",
                                ))
                            }
                        }
                    }
                    text
                }
                None | Some(Value::Null) if role == "assistant" => String::new(),
                None | Some(Value::Null) => {
                    return Err(ApiError::invalid(
                        &at("content"),
                        "missing_required_parameter",
                        format!("{} is required", at("content")),
                    ))
                }
                Some(_) => return Err(type_error(&at("content"), "a string or a list of parts")),
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// The chat's prompt ids, through the model's chat template; without a
/// tokenizer, the bytes of `role\ncontent\n` per message.
fn render_chat(
    messages: &[ChatMessage],
    tokenizer: Option<&Tokenizer>,
) -> Result<Vec<u32>, ApiError> {
    match tokenizer {
        Some(tok) => {
            let text = tok.apply_chat_template(messages, true).map_err(|e| {
                ApiError::new(
                    400,
                    "invalid_request_error",
                    "no_chat_template",
                    format!("this model cannot render a chat: {e}; use /v1/completions"),
                )
            })?;
            Ok(tok.encode(&text))
        }
        None => {
            let mut text = String::new();
            for m in messages {
                text.push_str(&m.role);
                text.push('\n');
                text.push_str(&m.content);
                text.push('\n');
            }
            Ok(encode(&text, None))
        }
    }
}

fn completion_prompt(value: Option<&Value>) -> Result<String, ApiError> {
    match value {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(list)) if list.len() == 1 && list[0].is_string() => {
            Ok(list[0].as_str().unwrap_or_default().to_string())
        }
        None | Some(Value::Null) => Err(ApiError::invalid(
            "prompt",
            "missing_required_parameter",
            "prompt is required",
        )),
        Some(_) => Err(type_error("prompt", "a string")),
    }
}

/// Token ids of `text`: the tokenizer's (special-token text is parsed, as
/// `run --prompt` does), or its bytes.
pub fn encode(text: &str, tokenizer: Option<&Tokenizer>) -> Vec<u32> {
    match tokenizer {
        Some(tok) => tok.encode(text),
        None => text.bytes().map(u32::from).collect(),
    }
}

fn stop_strings(value: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list: Vec<String> = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| type_error("stop", "a string or a list of strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(type_error("stop", "a string or a list of strings")),
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            "invalid_value",
            format!("at most {MAX_STOPS} stop strings"),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "invalid_value",
            "stop strings must not be empty",
        ));
    }
    Ok(list)
}

/// The extension `"model_trace": {"level": "off" | "lightweight" | "full"}`.
fn trace_level(value: Option<&Value>) -> Result<Option<Level>, ApiError> {
    let level = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o.get("level"),
        Some(_) => return Err(type_error("model_trace", "an object")),
    };
    match level {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Level::parse(s).map(Some).ok_or_else(|| {
            ApiError::invalid(
                "model_trace.level",
                "invalid_value",
                format!("unknown trace level {s:?} (off, lightweight or full)"),
            )
        }),
        Some(_) => Err(type_error("model_trace.level", "a string")),
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens`.
    Length,
}

impl FinishReason {
    /// The API's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What every response and chunk of one request shares.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The request's id (`chatcmpl-…`, `cmpl-…`).
    pub id: String,
    /// Its endpoint.
    pub endpoint: Endpoint,
    /// Seconds since the epoch when it arrived.
    pub created: u64,
    /// The model's name.
    pub model: String,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// The prompt's tokens.
    pub prompt: usize,
    /// Generated tokens.
    pub completion: usize,
}

impl Usage {
    fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        })
    }
}

impl Envelope {
    /// The whole response of a request that did not stream.
    pub fn response(
        &self,
        text: &str,
        finish: FinishReason,
        usage: Usage,
        model_trace: Value,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish.name(),
            }),
            Endpoint::Completions => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish.name(),
            }),
        };
        json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Chat => "chat.completion",
                Endpoint::Completions => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage.json(),
            "model_trace": model_trace,
        })
    }

    fn chunk(&self, choices: Value) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert(
            "object".into(),
            match self.endpoint {
                Endpoint::Chat => "chat.completion.chunk",
                Endpoint::Completions => "text_completion",
            }
            .into(),
        );
        m.insert("created".into(), self.created.into());
        m.insert("model".into(), self.model.clone().into());
        m.insert("choices".into(), choices);
        m
    }

    fn choice(&self, text: Option<&str>, first: bool, finish: Option<FinishReason>) -> Value {
        let finish = finish.map(FinishReason::name);
        match self.endpoint {
            Endpoint::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}])
            }
            Endpoint::Completions => json!([{
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }]),
        }
    }

    /// A chunk of text (the first one also names the role).
    pub fn text_chunk(&self, text: &str, first: bool) -> Value {
        Value::Object(self.chunk(self.choice(Some(text), first, None)))
    }

    /// The chunk that says why the generation ended; the last one unless
    /// a usage chunk follows, and then without `model_trace`.
    pub fn finish_chunk(&self, finish: FinishReason, model_trace: Option<Value>) -> Value {
        let mut m = self.chunk(self.choice(None, false, Some(finish)));
        if let Some(t) = model_trace {
            m.insert("model_trace".into(), t);
        }
        Value::Object(m)
    }

    /// The usage chunk (`stream_options.include_usage`): no choices, the
    /// usage and the trace.
    pub fn usage_chunk(&self, usage: Usage, model_trace: Value) -> Value {
        let mut m = self.chunk(json!([]));
        m.insert("usage".into(), usage.json());
        m.insert("model_trace".into(), model_trace);
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits<'static> {
        Limits {
            tokenizer: None,
            context: 64,
            default_seed: 9,
        }
    }

    fn parse(endpoint: Endpoint, body: &str) -> Result<Request, ApiError> {
        parse_request(endpoint, body.as_bytes(), &limits())
    }

    fn rejected(endpoint: Endpoint, body: &str) -> (u16, Option<String>, Option<&'static str>) {
        match parse(endpoint, body) {
            Ok(r) => panic!("accepted {body}: {r:?}"),
            Err(e) => (e.status, e.param, e.code),
        }
    }

    #[test]
    fn a_completion_request_reads_its_parameters() {
        let r = parse(
            Endpoint::Completions,
            r#"{"model": "m", "prompt": "abc", "max_tokens": 5, "temperature": 0,
                "top_p": 0.5, "seed": 3, "stop": ["x", "yz"], "stream": true,
                "stream_options": {"include_usage": true}, "model_trace": {"level": "full"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(r.prompt, vec![97, 98, 99]);
        assert_eq!(r.max_tokens, 5);
        assert_eq!(r.sampling.temperature, 0.0);
        assert_eq!(r.sampling.top_p, 0.5);
        assert_eq!(r.sampling.seed, 3);
        assert_eq!(r.stop, ["x", "yz"]);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.level, Some(Level::Full));
    }

    #[test]
    fn defaults_fill_the_rest_of_the_context() {
        let r = parse(Endpoint::Completions, r#"{"prompt": "abcd"}"#)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(r.max_tokens, 60);
        assert_eq!(r.sampling.seed, 9);
        assert_eq!(r.sampling.temperature, 1.0);
        assert!(!r.stream && r.stop.is_empty() && r.level.is_none());
    }

    #[test]
    fn a_chat_without_a_tokenizer_is_its_bytes() {
        let r = parse(
            Endpoint::Chat,
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            r.prompt,
            "user\nhi\n".bytes().map(u32::from).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_requests_name_the_parameter() {
        use Endpoint::*;
        let cases: &[(Endpoint, &str, Option<&str>, &str)] = &[
            (Chat, "{", None, "invalid_json"),
            (Chat, "[1]", None, "invalid_json"),
            (Chat, "{}", Some("messages"), "missing_required_parameter"),
            (
                Chat,
                r#"{"messages": []}"#,
                Some("messages"),
                "invalid_value",
            ),
            (
                Chat,
                r#"{"messages": "hi"}"#,
                Some("messages"),
                "invalid_type",
            ),
            (
                Chat,
                r#"{"messages": [1]}"#,
                Some("messages[0]"),
                "invalid_type",
            ),
            (
                Chat,
                r#"{"messages": [{"role": "king", "content": "x"}]}"#,
                Some("messages[0].role"),
                "invalid_value",
            ),
            (
                Chat,
                r#"{"messages": [{"role": "user"}]}"#,
                Some("messages[0].content"),
                "missing_required_parameter",
            ),
            (
                Completions,
                r#"{"prompt": 5}"#,
                Some("prompt"),
                "invalid_type",
            ),
            (
                Completions,
                r#"{"prompt": ""}"#,
                Some("prompt"),
                "invalid_value",
            ),
            (
                Completions,
                r#"{"prompt": "a", "max_tokens": 0}"#,
                Some("max_tokens"),
                "invalid_value",
            ),
            (
                Completions,
                r#"{"prompt": "a", "max_tokens": -3}"#,
                Some("max_tokens"),
                "invalid_value",
            ),
            (
                Completions,
                r#"{"prompt": "a", "max_tokens": "8"}"#,
                Some("max_tokens"),
                "invalid_type",
            ),
            (
                Completions,
                r#"{"prompt": "a", "max_tokens": 64}"#,
                Some("max_tokens"),
                "context_length_exceeded",
            ),
            (
                Completions,
                r#"{"prompt": "a", "max_tokens": 1e30}"#,
                Some("max_tokens"),
                "invalid_type",
            ),
            (
                Completions,
                r#"{"prompt": "a", "temperature": 3}"#,
                Some("temperature"),
                "invalid_value",
            ),
            (
                Completions,
                r#"{"prompt": "a", "temperature": "hot"}"#,
                Some("temperature"),
                "invalid_type",
            ),
            (
                Completions,
                r#"{"prompt": "a", "top_p": 0}"#,
                Some("top_p"),
                "invalid_value",
            ),
            (
                Completions,
                r#"{"prompt": "a", "stop": 3}"#,
                Some("stop"),
                "invalid_type",
            ),
            (
                Completions,
                r#"{"prompt": "a", "stop": ["", "x"]}"#,
                Some("stop"),
                "invalid_value",
            ),
            (
                Completions,
                r#"{"prompt": "a", "stop": ["a","b","c","d","e"]}"#,
                Some("stop"),
                "invalid_value",
            ),
            (
                Completions,
                r#"{"prompt": "a", "stream": "yes"}"#,
                Some("stream"),
                "invalid_type",
            ),
            (
                Completions,
                r#"{"prompt": "a", "n": 2}"#,
                Some("n"),
                "invalid_value",
            ),
            (
                Completions,
                r#"{"prompt": "a", "model_trace": {"level": "max"}}"#,
                Some("model_trace.level"),
                "invalid_value",
            ),
            (
                Completions,
                r#"{"prompt": "a", "seed": "s"}"#,
                Some("seed"),
                "invalid_type",
            ),
        ];
        for &(endpoint, body, param, code) in cases {
            let (status, p, c) = rejected(endpoint, body);
            assert_eq!(status, 400, "{body}");
            assert_eq!(p.as_deref(), param, "{body}");
            assert_eq!(c, Some(code), "{body}");
        }
        let long = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(64));
        assert_eq!(
            rejected(Endpoint::Completions, &long).2,
            Some("context_length_exceeded")
        );
        let (status, _, code) = match parse_request(Endpoint::Chat, b"{\"a\": \"\xff\"}", &limits())
        {
            Err(e) => (e.status, e.param, e.code),
            Ok(_) => panic!("accepted invalid UTF-8"),
        };
        assert_eq!((status, code), (400, Some("invalid_utf8")));
    }

    #[test]
    fn the_error_object_has_the_four_fields() {
        let e = ApiError::invalid("stop", "invalid_value", "no");
        let body = e.body();
        let err = &body["error"];
        assert_eq!(err["message"], "no");
        assert_eq!(err["type"], "invalid_request_error");
        assert_eq!(err["param"], "stop");
        assert_eq!(err["code"], "invalid_value");
    }
}
