"""A dataset of preprocessed cases read from a folder (BraTS2020 or generic layout)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from torch.utils.data import Dataset

from idm3d.data.cases import CaseFiles, find_cases, load_case, parse_modalities
from idm3d.data.preprocess import CaseRecord, PreprocessConfig, preprocess_case
from idm3d.errors import DataError

__all__ = ["VolumeDataset"]


class VolumeDataset(Dataset):
    """Cases of a data folder, each read, checked and preprocessed into a :class:`CaseRecord`.

    Items are :class:`CaseRecord` objects (C, X, Y, Z tensors in [-1, 1] plus mask and affine), not
    batches: draw training patches from them with :mod:`idm3d.data.patches`.

    Args:
        source: data folder, or cases already found with :func:`~idm3d.data.cases.find_cases`.
        modalities: channels to load, in order (e.g. ``("t1", "t2")``: source first, target last).
        config: preprocessing options.
        case_ids: keep only these cases (e.g. one part of a split); unknown ids raise DataError.
        cache: keep preprocessed cases in memory after the first access.
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[CaseFiles],
        modalities: Iterable[str] | str = ("t1", "t2"),
        config: PreprocessConfig | None = None,
        *,
        case_ids: Iterable[str] | None = None,
        cache: bool = True,
    ) -> None:
        self.modalities = parse_modalities(modalities)
        self.config = config or PreprocessConfig()
        cases = find_cases(source, self.modalities) if isinstance(source, (str, os.PathLike)) else list(source)
        if case_ids is not None:
            wanted = list(case_ids)
            by_id = {c.case_id: c for c in cases}
            if missing := [c for c in wanted if c not in by_id]:
                raise DataError(f"{source}: cases {missing[:5]} of the split are not in the data folder")
            cases = [by_id[c] for c in wanted]
        if not cases:
            raise DataError(f"{source}: no cases to load")
        self.cases = cases
        self.cache = cache
        self._records: dict[int, CaseRecord] = {}

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> CaseRecord:
        if index in self._records:
            return self._records[index]
        case = self.cases[index]
        volumes, affine = load_case(case)
        record = preprocess_case({m: volumes[m] for m in self.modalities}, affine, self.config, case_id=case.case_id)
        if self.cache:
            self._records[index] = record
        return record
