"""Integrations with training frameworks, each an optional extra.

kdkernels.integrations.hf: DistillationTrainer for Hugging Face transformers (pip install 'kdkernels[hf]').
"""
