"""The data layer: sources read, chat templates applied, tokenized, held out, streamed to disk and cached,
streamed, all as the data plan (`plan.py`) decided once. The files are the stages in that order; the shared
types sit at the bottom (`types.py`), so imports only run downwards. What the rest of lmtune uses is named here.
"""

from lmtune.data.chat import SIMPLE_TEMPLATE, Encoded, encode, ensure_chat_template, has_text, render
from lmtune.data.plan import decide
from lmtune.data.prepared import (
    eval_split,
    load_corpora,
    load_corpus,
    prepare,
    read_prepared,
    tokenizer_for,
    training_texts,
)
from lmtune.data.rows import check_conversation
from lmtune.data.sources import (
    FORMATS,
    data_format,
    eval_documents,
    eval_source,
    file_source,
    hub_name,
    identity,
    is_local,
    is_prepared,
    local_files,
    read_documents,
    split_txt,
    train_split,
    txt_documents,
)
from lmtune.data.split import content_hash, held_out, split_threshold
from lmtune.data.streams import Stream, cache_key
from lmtune.data.tokens import default_workers, join, token_dtype, tokenize, tokenizer_fingerprint, tokenizer_pool
from lmtune.data.types import ROLES, Conversation, Corpus, DataPlan, Documents, Source, SourcePlan, Split

__all__ = [
    "FORMATS", "ROLES", "SIMPLE_TEMPLATE", "Conversation", "Corpus", "DataPlan", "Documents", "Encoded", "Source",
    "SourcePlan", "Split", "Stream", "cache_key", "check_conversation", "content_hash", "data_format", "decide",
    "default_workers", "encode", "ensure_chat_template", "eval_documents", "eval_source", "eval_split", "file_source",
    "has_text", "held_out", "hub_name", "identity", "is_local", "is_prepared", "join", "load_corpora", "load_corpus",
    "local_files", "prepare", "read_documents", "read_prepared", "render", "split_threshold", "split_txt",
    "token_dtype", "tokenize", "tokenizer_fingerprint", "tokenizer_for", "tokenizer_pool", "train_split",
    "training_texts", "txt_documents",
]  # fmt: skip
