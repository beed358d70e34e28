//! The GGUF reader on arbitrary bytes: header, metadata, tensor headers;
//! then, for a file that parses, every typed getter, the first row of every
//! tensor decoded, and the model loaded from it (shape, weights, one traced
//! forward pass) when it describes one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use model_tracer::Full;
use model_tracer_llama::gguf::GgufFile;
use model_tracer_llama::model::{Config, KvCacheOptions, KvType, Llama, Weights};
use model_tracer_llama::quant::{dequantize, QMatrix};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    let keys: Vec<String> = file.metadata_keys().map(str::to_owned).collect();
    for key in &keys {
        let _ = file.get_u32(key);
        let _ = file.get_u64(key);
        let _ = file.get_f32(key);
        let _ = file.get_bool(key);
        let _ = file.get_str(key);
        let _ = file.get_str_array(key);
        let _ = file.get_i32_array(key);
    }
    for info in file.tensors() {
        let bytes = file.tensor_bytes(info);
        assert_eq!(bytes.len(), info.size_bytes, "tensor `{}`", info.name);
        let _ = info.n_elements();
        if info.rows() == 0 {
            continue;
        }
        // Every row lies inside the file, so a row's length is bounded by
        // the input: the buffer below cannot be huge.
        let row_bytes = info.row_bytes();
        if let Some(row) = bytes.get(..row_bytes) {
            let mut out = vec![0.0f32; info.row_len()];
            let _ = dequantize(info.ggml_type, row, &mut out);
        }
        if let Ok(m) =
            QMatrix::from_bytes(info.ggml_type, info.rows(), info.row_len(), bytes.to_vec())
        {
            let mut out = vec![0.0f32; m.cols()];
            m.dequantize_row(m.rows() - 1, &mut out);
        }
    }
    let Ok(config) = Config::from_gguf(&file) else {
        return;
    };
    let Ok(weights) = Weights::from_gguf(&file, &config) else {
        return;
    };
    let cache = KvCacheOptions {
        capacity: 4,
        sinks: 1,
        kv_type: KvType::F32,
    };
    if let Ok(mut model) = Llama::new(config, weights, None, cache, Full) {
        let _ = model.forward(0);
        let _ = model.forward(u32::MAX);
    }
});
