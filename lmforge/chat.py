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


def own_format(tokenizer) -> bool:
    """Whether the tokenizer carries a base model's own chat template, marked for training by the base stage."""
    template = tokenizer.chat_template or ""
    return END not in tokenizer.get_vocab() and "{% generation %}" in template and END not in template


def end_token(tokenizer) -> str:
    """The token that ends a turn: lmforge's <|end|>, or the base's eos for a model with its own chat format
    (ChatML's <|im_end|>)."""
    return END if END in tokenizer.get_vocab() else tokenizer.eos_token


def end_token_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(end_token(tokenizer))


# A pretrained model's own ChatML template (SmolLM2, Qwen, ...), rewritten with `{% generation %}` around each
# reply so TRL can mask the prompt; `default_system` is the system turn the base adds when a chat has none.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' and default_system -%}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
PROBES = (  # conversations a rewritten template must render exactly as the base's does
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
)


def with_masks(template: str) -> str | None:
    """`template` with its replies marked for assistant-only loss, rendering every probe exactly as `template`
    does; None when its shape is not one lmforge knows how to mark (lmforge's own and ChatML)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    if "{% generation %}" in template:
        return template

    def render(tpl: str, chat: list[dict], prompt: bool) -> str:
        return render_jinja_template([chat], chat_template=tpl, add_generation_prompt=prompt)[0][0]

    if "<|im_start|>" not in template:
        return None
    head = render(template, [{"role": "user", "content": "x"}], False)
    system = head.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0] if head.startswith(
        "<|im_start|>system\n") else ""
    marked = "{%- set default_system = " + repr(system) + " -%}" + CHATML_TEMPLATE
    same = all(render(marked, chat, prompt) == render(template, chat, prompt)
               for chat in PROBES for prompt in (False, True))
    return marked if same else None
