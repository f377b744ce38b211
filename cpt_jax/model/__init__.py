"""The Llama-family transformer and Hugging Face import/export."""
