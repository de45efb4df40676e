"""A user's own eval set (`python -m analysis eval MODEL --suite-file items.jsonl`), checked whole
before any model loads. The reader is merging.item_file (DRIFT's training data has the same format,
and merging may not import analysis); this module keeps the name the eval code and its callers use.
"""

from __future__ import annotations

from merging.item_file import (
    MAX_ANSWER_CHARS,
    MAX_FILE_BYTES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_SIDE,
    MAX_ITEMS,
    MAX_QUESTION_CHARS,
    ItemError,
    check_items,
    image_header,
    image_path,
    open_images,
    parse_item,
    read_items,
)

__all__ = ["MAX_ANSWER_CHARS", "MAX_FILE_BYTES", "MAX_IMAGE_BYTES", "MAX_IMAGE_SIDE", "MAX_ITEMS",
           "MAX_QUESTION_CHARS", "ItemError", "check_items", "image_header", "image_path", "open_images",
           "parse_item", "read_items"]
