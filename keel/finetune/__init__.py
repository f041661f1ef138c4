"""LoRA fine-tuning: training data, the trainer, its worker process and the job runner the server uses."""
