"""Integrations with training frameworks, each an optional extra.

kdkernels.integrations.hf: DistillationTrainer for Hugging Face transformers (pip install 'kdkernels[hf]').
"""


def __getattr__(name):
    # `kdkernels.integrations.hf` after `import kdkernels`: imported on first use (it needs transformers)
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'kdkernels.integrations' has no attribute '{name}'")
