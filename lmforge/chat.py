"""Special tokens and the chat template shared by the tokenizer and every model after it."""

EOS, PAD, SYSTEM, USER, ASSISTANT, END = (
    "<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
SPECIAL_TOKENS = (EOS, PAD, SYSTEM, USER, ASSISTANT, END)  # every tokenizer lmforge saves has these

# Compact on purpose: small models learn the format fast. `{% generation %}` marks the assistant's
# tokens so TRL can put the loss on them alone (assistant_only_loss / return_assistant_tokens_mask).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def configure(tokenizer):
    """Give a fast tokenizer lmforge's specials and chat template (in place) and return it."""
    tokenizer.eos_token = EOS
    tokenizer.pad_token = PAD
    tokenizer.bos_token = EOS
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
