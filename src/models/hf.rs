//! Hugging Face `config.json` loader.
