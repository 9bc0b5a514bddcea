"""Tokenizers behind one small protocol: an adapter over Hugging Face tokenizers and a built-in byte tokenizer.

The rest of the pipeline (prompt data, rollout stop conditions, the 'tokenizers differ' check between student and
teacher) only uses the protocol below. HF tokenizers come from the model directory (or are built by transformers
from GGUF metadata); inline-config models get ``ByteTokenizer``, which needs no files and no download.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from opdgraph.models.errors import ModelLoadError

BYTE_TOKENIZER_FILE = "opdgraph_byte_tokenizer.json"


class Tokenizer(Protocol):
    name: str  # equal names <=> same token ids for the same text
    vocab_size: int  # number of ids the tokenizer can produce
    eos_token_ids: list[int]  # any of these ends a response
    pad_token_id: int

    def encode(self, text: str) -> list[int]: ...  # no special tokens added
    def decode(self, ids: list[int]) -> str: ...
    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 continue_final_message: bool = False) -> list[int]: ...  # True: the last (assistant) turn left open
    def save(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes, then the special tokens; chat turns are <|role|> content <|end|>.

    A chat starts with <|bos|>; the generation prompt is <|assistant|>; a response ends with <|end|> or <|eos|>.
    """

    SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    name = "opdgraph-byte-v1"

    def __init__(self, model_vocab_size: int | None = None):
        self.vocab_size = 256 + len(self.SPECIALS)
        if model_vocab_size is not None and model_vocab_size < self.vocab_size:
            raise ModelLoadError(f"config vocab_size={model_vocab_size} is too small for the built-in byte "
                                 f"tokenizer, which needs vocab_size >= {self.vocab_size}")
        self.special_ids = {token: 256 + index for index, token in enumerate(self.SPECIALS)}
        self.bos_token_id = self.special_ids["<|bos|>"]
        self.pad_token_id = self.special_ids["<|pad|>"]
        self.eos_token_ids = [self.special_ids["<|eos|>"], self.special_ids["<|end|>"]]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        pieces, pending = [], bytearray()
        for token in ids:
            if token < 256:
                pending.append(token)
                continue
            pieces.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            # Model vocabularies are often padded past the tokenizer's ids; show such ids rather than fail.
            special = token - 256
            pieces.append(self.SPECIALS[special] if special < len(self.SPECIALS) else f"<|id {token}|>")
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 continue_final_message: bool = False) -> list[int]:
        """`continue_final_message`: the last message (an assistant turn) is left open, without its <|end|>, for
        the model to continue (a gold prefix); no generation prompt follows it."""
        if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
            raise ValueError("continue_final_message needs an assistant message last")
        ids = [self.bos_token_id]
        for index, message in enumerate(messages):
            role = message.get("role")
            if f"<|{role}|>" not in self.special_ids:
                raise ValueError(f"message {index}: role {role!r} must be one of system, user, assistant")
            ids += [self.special_ids[f"<|{role}|>"], *self.encode(message["content"]), self.special_ids["<|end|>"]]
        if continue_final_message:
            return ids[:-1]
        if add_generation_prompt:
            ids.append(self.special_ids["<|assistant|>"])
        return ids

    def with_chat_options(self, template: str | None, variables: dict) -> "ByteTokenizer":
        """The byte format has no template to replace and reads no variables (the caller notes ignored ones)."""
        if template is not None:
            raise ModelLoadError("the built-in byte tokenizer (inline-config models) has a fixed chat format and "
                                 "takes no chat_template file; remove chat_template, or use an HF tokenizer")
        return self

    def save(self, directory: str | Path) -> None:
        (Path(directory) / BYTE_TOKENIZER_FILE).write_text(json.dumps({"name": self.name}) + "\n")


class HFTokenizer:
    """Adapter from a transformers tokenizer to the protocol."""

    def __init__(self, tokenizer: Any, generation_eos_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_token_ids = sorted(set(eos + list(generation_eos_ids or [])))
        if not self.eos_token_ids:
            raise ModelLoadError(f"tokenizer {tokenizer.name_or_path!r} defines no eos token (tokenizer eos_token "
                                 "or generation_config.json eos_token_id)")
        # Padding never reaches the model's attention (batches are packed); any valid id does, eos is the safe one.
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=True)
        self.name = f"hf:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"
        self.chat_template: str | None = None  # replaces the tokenizer's own template when set
        self.chat_variables: dict[str, Any] = {}  # extra template variables, e.g. enable_thinking

    def with_chat_options(self, template: str | None, variables: dict) -> "HFTokenizer":
        """A copy (same transformers tokenizer) that renders chats with `template` (Jinja source; None keeps the
        tokenizer's own) and the extra template `variables`."""
        configured = copy.copy(self)
        configured.chat_template, configured.chat_variables = template, dict(variables)
        return configured

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 continue_final_message: bool = False) -> list[int]:
        if not self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ModelLoadError(f"tokenizer {self.tokenizer.name_or_path!r} has no chat template (give the model "
                                 "a chat_template file)")
        import jinja2

        try:
            ids = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                     add_generation_prompt=add_generation_prompt and not
                                                     continue_final_message,
                                                     continue_final_message=continue_final_message, tokenize=True,
                                                     return_dict=False, **self.chat_variables)
        except jinja2.TemplateError as problem:  # a template's syntax error or its own raise_exception(...)
            source = "the chat_template file" if self.chat_template else "its chat template"
            raise ModelLoadError(f"tokenizer {self.tokenizer.name_or_path!r}: {source} fails on this prompt: "
                                 f"{problem}") from problem
        return list(ids)

    def save(self, directory: str | Path) -> None:
        """Saved with the template the model was run with (template variables are not part of a tokenizer)."""
        if self.chat_template is None:
            self.tokenizer.save_pretrained(str(directory))
            return
        own = self.tokenizer.chat_template  # the transformers tokenizer is shared with the unconfigured adapter
        self.tokenizer.chat_template = self.chat_template
        try:
            self.tokenizer.save_pretrained(str(directory))
        finally:
            self.tokenizer.chat_template = own


def _generation_eos_ids(directory: Path) -> list[int]:
    path = directory / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def load_tokenizer_from_dir(directory: Path, model_vocab_size: int) -> Tokenizer:
    """The tokenizer saved beside an HF checkpoint (or our byte-tokenizer marker)."""
    if (directory / BYTE_TOKENIZER_FILE).exists():
        return ByteTokenizer(model_vocab_size)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((directory / name).exists() for name in tokenizer_files):
        raise ModelLoadError(f"{directory}: no tokenizer files (looked for {', '.join(tokenizer_files)} and "
                             f"{BYTE_TOKENIZER_FILE}); save the tokenizer next to the weights")
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{directory}: cannot load tokenizer: {error}") from error
    return HFTokenizer(tokenizer, _generation_eos_ids(directory))


def load_tokenizer_from_gguf(path: Path) -> Tokenizer:
    import transformers

    from opdgraph.models.gguf_checkpoint import special_token_ids

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"{path}: cannot build a tokenizer from the GGUF metadata: {error}") from error
    # The file's own bos / eos / pad ids win: transformers' GGUF conversion has mapped them wrongly in some versions
    # (5.17 gave the bos id as eos, so responses would never end at the real eos).
    attributes = {"bos": "bos_token", "eos": "eos_token", "padding": "pad_token"}
    for name, token_id in special_token_ids(path).items():
        setattr(tokenizer, attributes[name], tokenizer.convert_ids_to_tokens(token_id))
    return HFTokenizer(tokenizer)
