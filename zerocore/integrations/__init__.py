"""zerocore integrations with other libraries. Each is its own module, imported on demand, so `import zerocore`
never imports them:

- `zerocore.integrations.transformers`: `ZeroTrainer` (a drop-in `transformers.Trainer` that trains with
  ZeroOptimizer and reads `TrainingArguments(deepspeed=...)`) and `from_pretrained` (Hugging Face weights loaded
  straight into a partitioned model).
"""
