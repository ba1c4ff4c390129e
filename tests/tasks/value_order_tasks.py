"""Tasks whose memory follows the batch's values in ways no item size or nonzero count sees
(review, session 23): a padding id that is not 0, a model that trims its batch to the longest
real row through a value read, and a loss on the answer tokens only (labels of -100 on the
prompt). Each has a few heavy items among many light ones; ``HEAVY`` names them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import Dataset

from bsselect import Task

N, T, VOCAB = 300, 48, 64
PAD = VOCAB - 1  # the last id, as GPT-2 pads with its eos
HEAVY = list(range(7, N, 30))  # 10 items: long sequences / long answers


def _lengths(g: torch.Generator, short: int, long: int) -> list[int]:
    lengths = torch.randint(3, short, (N,), generator=g).tolist()
    for i in HEAVY:
        lengths[i] = long
    return lengths


class PrePadded(Dataset):
    """Token ids stored padded to ``width`` with ``PAD``, their lengths (``lengths_of`` the
    generator: a few long among many short, by default), a class label."""

    def __init__(self, lengths_of=lambda g: torch.tensor(_lengths(g, 10, T)),
                 width: int = T) -> None:
        g = torch.Generator().manual_seed(0)
        self.lengths = lengths_of(g)
        self.ids = torch.randint(1, PAD, (N, width), generator=g)
        for i, n in enumerate(self.lengths.tolist()):
            self.ids[i, n:] = PAD
        self.y = torch.randint(0, 4, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return (self.ids[i], self.lengths[i]), self.y[i]


class PackedLSTM(nn.Module):
    enforce_sorted = False  # True: the batch must come sorted by length

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.rnn = nn.LSTM(16, 96, batch_first=True)
        self.out = nn.Linear(96, 4)

    def forward(self, x):
        ids, lengths = x
        packed = pack_padded_sequence(self.emb(ids), lengths, batch_first=True,
                                      enforce_sorted=self.enforce_sorted)
        _, (h, _) = self.rnn(packed)
        return self.out(h[-1])


def prepadded_task() -> Task:
    return Task(model=PackedLSTM, train_data=PrePadded(), loss_fn=F.cross_entropy,
                optimizer=torch.optim.Adam, lr=1e-3, base_batch_size=8)


class Masked(Dataset):
    """Token ids padded to ``T`` with 0 and their attention mask."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        lengths = _lengths(g, 8, T)
        self.ids = torch.zeros(N, T, dtype=torch.long)
        self.mask = torch.zeros(N, T, dtype=torch.long)
        for i, n in enumerate(lengths):
            self.ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
            self.mask[i, :n] = 1

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return {"ids": self.ids[i], "mask": self.mask[i]}, self.ids[i, 0] % 4


class Trimmed(nn.Module):
    """Cuts the batch to its longest real row (``int(mask.sum(1).max())``), then attends:
    (B, t, t) scores, so the memory grows with the longest row of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        longest = int(x["mask"].sum(1).max())
        h = self.emb(x["ids"][:, :longest])
        scores = torch.softmax(h @ h.transpose(1, 2), dim=-1)
        return self.out((scores @ h).mean(1))


def trimmed_task() -> Task:
    return Task(model=Trimmed, train_data=Masked(), loss_fn=F.cross_entropy,
                optimizer=torch.optim.SGD, lr=0.1, base_batch_size=8)


class PromptAnswer(Dataset):
    """Items of different lengths: most a long prompt and a short answer, ``HEAVY`` a short
    prompt and a long answer; labels -100 on the prompt."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(2)
        self.items = []
        for i in range(N):
            prompt, answer = (3, 30) if i in HEAVY else (40, 2)
            ids = torch.randint(1, VOCAB, (prompt + answer,), generator=g)
            labels = ids.clone()
            labels[:prompt] = -100
            self.items.append({"ids": ids, "labels": labels})

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.items[i]


def pad_prompt_answer(items: list) -> tuple:
    longest = max(len(it["ids"]) for it in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    labels = torch.full((len(items), longest), -100, dtype=torch.long)
    for k, it in enumerate(items):
        ids[k, :len(it["ids"])] = it["ids"]
        labels[k, :len(it["labels"])] = it["labels"]
    return ids, labels


class AnswerHead(nn.Module):
    """Logits over a large vocabulary on the answer tokens only (``h[labels != -100]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, 8192)

    def forward(self, batch):
        ids, labels = batch
        h = self.emb(ids)
        keep = labels != -100
        return self.head(h[keep]), labels[keep]


def answer_loss(out, _target) -> torch.Tensor:
    logits, labels = out
    return F.cross_entropy(logits, labels.clamp(max=8191))


def answer_task() -> Task:
    return Task(model=AnswerHead, train_data=PromptAnswer(), loss_fn=answer_loss,
                collate_fn=lambda items: (pad_prompt_answer(items), None),
                optimizer=torch.optim.SGD, lr=0.1, base_batch_size=8)


LONG_PROMPTS = [290, 295, 299]  # a 300-token prompt, a 2-token answer


class MixedPromptAnswer(PromptAnswer):
    """``PromptAnswer`` with three very long prompts too: at 8 items the long answers are the
    heaviest batch, at 64 the long prompts (which pad every row) weigh more (review)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        for i in LONG_PROMPTS:
            ids = torch.randint(1, VOCAB, (302,), generator=g)
            labels = ids.clone()
            labels[:300] = -100
            self.items[i] = {"ids": ids, "labels": labels}


class PerTokenAnswerHead(AnswerHead):
    """An MLP over every (padded) token, then the large head on the answer tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, batch):
        ids, labels = batch
        h = self.down(torch.relu(self.up(self.emb(ids))))
        keep = labels != -100
        return self.head(h[keep]), labels[keep]


def mixed_task() -> Task:
    return Task(model=PerTokenAnswerHead, train_data=MixedPromptAnswer(), loss_fn=answer_loss,
                collate_fn=lambda items: (pad_prompt_answer(items), None),
                optimizer=torch.optim.SGD, lr=0.1, base_batch_size=8)


class Unsorted(Dataset):
    """Token sequences of 3..40 tokens in no order; the first two happen to be long, then
    short (a check of items 0 and 1 sees them sorted)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(4)
        self.lengths = torch.randint(3, 41, (N,), generator=g).tolist()
        self.lengths[0], self.lengths[1] = 40, 30

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return torch.randint(1, VOCAB, (self.lengths[i],)), i % 4


def pad_in_given_order(items: list) -> tuple:
    longest = max(len(x) for x, _ in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    for k, (x, _) in enumerate(items):
        ids[k, :len(x)] = x
    lengths = torch.tensor([len(x) for x, _ in items])
    return (ids, lengths), torch.tensor([y for _, y in items])


class SortedPackedLSTM(PackedLSTM):
    """``pack_padded_sequence(enforce_sorted=True)``: the batch must come sorted."""

    enforce_sorted = True


def unsorted_task() -> Task:
    return Task(model=SortedPackedLSTM, train_data=Unsorted(), loss_fn=F.cross_entropy,
                collate_fn=pad_in_given_order, optimizer=torch.optim.SGD, lr=0.1,
                base_batch_size=8)


def near_uniform_task() -> Task:
    """Lengths 91-100 padded to 100 (a tenth apart at most)."""
    near = PrePadded(lambda g: torch.randint(91, 101, (N,), generator=g), width=100)
    return Task(model=PackedLSTM, train_data=near, loss_fn=F.cross_entropy,
                optimizer=torch.optim.Adam, lr=1e-3, base_batch_size=8)


SEP = 1  # a separator token: the shorter an item, the more of them (review, session 27)


class Separated(Dataset):
    """Token sequences of 6..48 ids; an item of k tokens holds (48 - k) // 2 separators, so
    the longest items hold none."""

    def __init__(self, n: int = 400) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(n):
            k = int(torch.randint(6, 49, (1,), generator=g))
            ids = torch.randint(2, VOCAB, (k,), generator=g)
            ids[torch.randperm(k, generator=g)[:(48 - k) // 2]] = SEP
            self.items.append(ids)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.items[i], int(self.items[i].sum()) % 4


def pad_ids(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(items), max(len(x) for x, _ in items), dtype=torch.long)
    for i, (x, _) in enumerate(items):
        ids[i, :len(x)] = x
    return ids, torch.tensor([y for _, y in items])


class Segments(nn.Module):
    """A wide layer on the separators' features only: memory follows their count, which no
    size or nonzero count of the items sees."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.wide = nn.Linear(32, 4096)
        self.out = nn.Linear(4096, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seg = torch.relu(self.wide(self.emb(ids)[ids == SEP]))
        return self.out(seg.mean(0, keepdim=True)).expand(ids.shape[0], -1)


def separated_task() -> Task:
    return Task(model=Segments, train_data=Separated(), loss_fn=F.cross_entropy,
                collate_fn=pad_ids, optimizer=torch.optim.SGD, lr=0.1, base_batch_size=8)
