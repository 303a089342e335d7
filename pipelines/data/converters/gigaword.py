"""Gigaword-style parallel text files (<split>.src articles, <split>.tgt summaries) -> summarization rows.

Line n of <split>.src pairs with line n of <split>.tgt: id "<dataset>/<split>/<n>" (n from 0), text =
the article, target = the summary, whitespace runs collapsed and nothing else changed (OFA's "<unk>"
handling belongs to the task). Lines past the end of the shorter file are BadRows "unpaired_line".
"""

from collections.abc import Iterator, Sequence
from itertools import zip_longest
from pathlib import Path

from ofa_model.errors import EMPTY_TEXT, UNPAIRED_LINE
from pipelines.data.converters._common import check_limit, select_splits, text_or_none
from pipelines.data.readers.rows import BadRow, make_row

SPLITS = ("train", "val", "test")


def convert_gigaword(
    *,
    data_dir: str,
    splits: Sequence[str] | None = None,
    limit: int | None = None,
    dataset: str = "gigaword",
    source_suffix: str = ".src",
    target_suffix: str = ".tgt",
) -> Iterator[dict | BadRow]:
    """Summarization rows from <data_dir>/<split><source_suffix> and <split><target_suffix>.

    splits: default every one of train/val/test whose two files exist. limit: at most this many line
    pairs per split.
    """
    check_limit(limit)
    root = Path(data_dir)
    available = [
        s for s in SPLITS if (root / f"{s}{source_suffix}").is_file() and (root / f"{s}{target_suffix}").is_file()
    ]
    if splits is None and not available:
        raise FileNotFoundError(f"{dataset}: no <split>{source_suffix} / <split>{target_suffix} pair in {data_dir}")
    for split in select_splits(available, splits, dataset):
        src_path, tgt_path = root / f"{split}{source_suffix}", root / f"{split}{target_suffix}"
        with open(src_path, encoding="utf-8") as src, open(tgt_path, encoding="utf-8") as tgt:
            for n, (article, summary) in enumerate(zip_longest(src, tgt)):
                if limit is not None and n >= limit:
                    break
                row_id, source = f"{dataset}/{split}/{n}", f"{src_path}:{n + 1}"
                if article is None or summary is None:
                    missing = src_path if article is None else tgt_path
                    yield BadRow(id=row_id, reason=UNPAIRED_LINE, detail=f"{missing} has no line {n + 1}",
                                 source=source)
                    continue
                text, target = text_or_none(article), text_or_none(summary)
                if text is None or target is None:
                    yield BadRow(id=row_id, reason=EMPTY_TEXT, detail="empty article or summary line", source=source)
                    continue
                yield make_row(source, id=row_id, task="summarization", split=split, dataset=dataset, text=text,
                               target=target)
