"""Moving weights out of (and into) megascale: Hugging Face ``transformers`` Llama directories."""

from megascale.export.hf import export_hf, import_hf, model_config_of

__all__ = ["export_hf", "import_hf", "model_config_of"]
