//! Frozen text encoders and their tokenizer.
