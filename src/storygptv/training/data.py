"""Deterministic, resumable training data: the stories, the batch order and the per-batch collator seeds.

The batch of micro-step ``i`` on rank ``r`` (which examples, and the collator's randomness for them) is a
pure function of ``(seed, i, r)``: :class:`ResumableBatchSampler` draws epoch permutations from
:func:`derive_seed`, and :class:`seeded_collate` reseeds the collator (its public ``reseed(seed)``) before
each batch. A resumed run therefore reads exactly the batches an uninterrupted one would, without loading
the skipped ones and without checkpointing generator states.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .checks import TrainingSetupError

__all__ = [
    "IndexedBatchDataset",
    "ResumableBatchSampler",
    "derive_seed",
    "load_train_stories",
    "make_train_dataloader",
    "next_batch",
    "seeded_collate",
    "step_generator",
]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and runs)."""
    text = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def step_generator(*parts: Any, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` of ``parts``.

    Use ``step_generator(seed, "noise", micro_step, rank)`` for the noise and timesteps of a micro-step,
    so a resumed run draws the same values without checkpointing generator states.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(*parts))
    return generator


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless, seeded batch sampler: yields ``[(batch_index, example_index), ...]`` for this rank.

    Epoch ``e`` is a permutation of the examples seeded by ``(seed, e)``. Each global batch holds
    ``batch_size * num_replicas`` indices; rank ``r`` takes its contiguous slice. Incomplete tail
    batches are dropped (every rank gets the same number of batches). ``start_batch`` skips already
    consumed batches without loading them (set by :func:`storygptv.training.resume.resume_training`).

    Use with :class:`IndexedBatchDataset` and :class:`seeded_collate` (:func:`make_train_dataloader`).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        start_batch: int = 0,
    ) -> None:
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.start_batch = int(start_batch)
        self.batches_per_epoch = self.num_examples // (self.batch_size * self.num_replicas)
        if self.batches_per_epoch < 1:
            raise TrainingSetupError(
                f"The dataset has {self.num_examples} examples: fewer than one global batch "
                f"({self.batch_size} x {self.num_replicas} processes). Lower --train_batch_size or add data."
            )

    def epoch_of(self, batch_index: int) -> int:
        """The epoch that batch ``batch_index`` belongs to."""
        return batch_index // self.batches_per_epoch

    def indices(self, batch_index: int) -> list[int]:
        """This rank's example indices of global batch ``batch_index``."""
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        order = torch.randperm(self.num_examples, generator=generator)
        size = self.batch_size * self.num_replicas
        start = within * size + self.rank * self.batch_size
        return order[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch_index = self.start_batch
        while True:
            yield [(batch_index, i) for i in self.indices(batch_index)]
            batch_index += 1

    def __len__(self) -> int:  # endless; report one epoch for progress displays
        return self.batches_per_epoch


class IndexedBatchDataset(torch.utils.data.Dataset):
    """Wrap a map-style dataset so that ``ds[(batch_index, i)]`` returns ``(batch_index, i, ds[i])``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, Any]:
        batch_index, index = key
        return batch_index, int(index), self.dataset[int(index)]


class seeded_collate:  # noqa: N801 - used like a function
    """``collate_fn`` that reseeds the collator before each batch.

    The items are ``(batch_index, example_index, example)`` triples (:class:`IndexedBatchDataset`); the
    collator's randomness for the batch is seeded, through its public ``reseed(seed)`` method, with
    ``derive_seed(seed, "collate", batch_index, rank)``: the same in any DataLoader worker and after a
    resume. The batch dict gains ``batch_index`` (int) and, with ``with_example_index``, ``example_index``
    (a LongTensor of the dataset rows, e.g. to look up cached latents).
    """

    def __init__(self, collator: Any, seed: int, rank: int = 0, with_example_index: bool = False) -> None:
        if not callable(getattr(collator, "reseed", None)):
            raise TypeError(
                f"{type(collator).__name__} has no `reseed(seed)` method: the training loader reseeds its "
                "collator before every batch (give it one, a no-op if it draws no random numbers)."
            )
        self.collator = collator
        self.seed = int(seed)
        self.rank = int(rank)
        self.with_example_index = with_example_index

    def __call__(self, items: Sequence[tuple[int, int, Any]]) -> dict[str, Any]:
        batch_index = int(items[0][0])
        # Reseeded in place (not copied): the collator's one-time warnings stay one-time.
        self.collator.reseed(derive_seed(self.seed, "collate", batch_index, self.rank))
        batch = dict(self.collator([example for _, _, example in items]))
        batch["batch_index"] = batch_index
        if self.with_example_index:
            batch["example_index"] = torch.tensor([index for _, index, _ in items], dtype=torch.long)
        return batch


def make_train_dataloader(
    dataset: Any,
    sampler: ResumableBatchSampler,
    collator: Any,
    *,
    seed: int,
    num_workers: int = 0,
    with_example_index: bool = False,
) -> torch.utils.data.DataLoader:
    """The deterministic training loader: ``dataset`` batched by ``sampler`` and collated by ``collator``
    reseeded per batch from ``seed`` (``--seed``) and the sampler's rank (:class:`seeded_collate`).
    ``num_workers`` is ``--dataloader_num_workers``."""
    return torch.utils.data.DataLoader(
        IndexedBatchDataset(dataset),
        batch_sampler=sampler,
        collate_fn=seeded_collate(collator, seed, sampler.rank, with_example_index=with_example_index),
        num_workers=num_workers,
    )


def next_batch(data_iter: Iterator[dict[str, Any]], micro: int) -> dict[str, Any]:
    """The next batch of a :func:`make_train_dataloader` loader, checked to be micro-step ``micro``'s;
    its ``batch_index`` is removed (the rest goes to the model)."""
    batch = next(data_iter)
    index = batch.pop("batch_index")
    if index != micro:
        raise RuntimeError(f"Data order broke: batch {index} at micro-step {micro}.")
    return batch


def load_train_stories(
    dataset: str,
    *,
    data_dir: str | None = None,
    split: str = "train",
    seed: int = 0,
    num_stories: int | None = None,
    train_dataset_path: str | None = None,
    **kwargs: Any,
) -> Any:
    """The training stories (one row per story).

    Args:
        dataset: ``--dataset`` (``flintstones``, ``pororo``, ``synthsv`` or ``folder``).
        data_dir: ``--data_dir``, the release folder of FlintstonesSV / PororoSV, or the story folder.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        seed: ``--seed`` (SynthSV generates its stories from it).
        num_stories: ``--num_stories``: only the first N stories.
        train_dataset_path: ``--train_dataset_path``, a ``datasets`` ``save_to_disk`` folder used
            instead of ``dataset`` (its ``split`` when it is a ``DatasetDict``).
        kwargs: passed to :func:`storygptv.data.load_story_dataset` (``frames_per_story``, ``referential``...).
    """
    if train_dataset_path:
        import datasets

        data = datasets.load_from_disk(train_dataset_path)
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
        if num_stories is not None:
            data = data.select(range(min(len(data), num_stories)))
        return data
    from ..data import load_story_dataset

    if num_stories is not None:
        kwargs.setdefault("num_stories", num_stories)
    return load_story_dataset(dataset, data_dir=data_dir, split=split, seed=seed, **kwargs)
