"""Data layer: corpus files -> sentencepiece tokenizer -> memory-mapped tokens -> batches.

``prepare_dataset`` / ``ensure_stdlib_dataset`` build a directory with a
tokenizer, ``train``/``val`` token files and a manifest; training opens them
with ``Tokenizer`` and ``TokenFile`` and walks them with
``DistributedBatchSampler`` + ``batch_from_indices``.
"""

from megascale.data.corpus import read_documents, stdlib_source_files
from megascale.data.prepare import ensure_stdlib_dataset, load_manifest, prepare_dataset, require_tokenizer
from megascale.data.sampler import DistributedBatchSampler, SamplerState, batch_from_indices
from megascale.data.tokenizer import Tokenizer, train_tokenizer
from megascale.data.tokens import TokenFile, TokenFileWriter, write_token_file

__all__ = [
    "DistributedBatchSampler",
    "SamplerState",
    "TokenFile",
    "TokenFileWriter",
    "Tokenizer",
    "batch_from_indices",
    "ensure_stdlib_dataset",
    "load_manifest",
    "prepare_dataset",
    "read_documents",
    "require_tokenizer",
    "stdlib_source_files",
    "train_tokenizer",
    "write_token_file",
]
