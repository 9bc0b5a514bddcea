"""A fake byte-level chat tokenizer for data tests: UTF-8 bytes of "role: content\\n" per message."""


class ByteChatTokenizer:
    """Encodes "role: content\\n" per message, then "assistant: " as the generation prompt."""

    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def chat_ids(self, messages, add_generation_prompt=True):
        text = "".join(f"{message['role']}: {message['content']}\n" for message in messages)
        return self.encode(text + ("assistant: " if add_generation_prompt else ""))
