"""A reward model as the stages use it: loading a one-output sequence classifier and scoring conversations
(read at each sequence's last token). Shared by the reward stage (before/after measurements) and ppo
(the reward signal and its held-out evaluation)."""

from __future__ import annotations

from pathlib import Path

import torch

ACCURACY_KEY = "test_accuracy"  # the reward stage's held-out pairwise accuracy, which ppo's quality gate reads


def load_reward_model(path: Path, pad_token_id: int):
    """A sequence classifier with one output; from a causal LM dir the score head starts random."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "score.weight newly initialised" report is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, pad_token_id=pad_token_id,
                                                                   use_safetensors=True, trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_token_id  # where the classifier finds each sequence's last token
    return model


@torch.no_grad()
def score_ids(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 64) -> torch.Tensor:
    """Reward of each token sequence (read at its last token), right-padded in batches."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        out.append(logits[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the chat template, exactly as RewardTrainer tokenizes it."""
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 64) -> torch.Tensor:
    return score_ids(model, [chat_ids(tokenizer, c) for c in conversations], tokenizer.pad_token_id, batch_size)
