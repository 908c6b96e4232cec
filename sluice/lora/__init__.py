"""Multi-LoRA serving: adapters over one base model, mixed in one batch (`--enable-lora`)."""
