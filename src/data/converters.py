"""The dataset converters that preprocess.py wires, one per way people arrive (README
"Question format"): the original FiD recipe (`convert_fid`), a DPR retriever output
(`convert_dpr`), a BM25 run joined with questions and passages (`join_bm25`) and question
files without passages (`convert_questions`). Every output is written atomically; every
bad input stops with a message naming the file and the line or example.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from src.corpus.passages import PassageStore
from src.data.public_files import (
    iter_question_records,
    iter_records,
    normalize_passage_id,
    read_json,
    read_questions,
    read_run,
    require_file,
    to_question,
)
from src.data.questions import parse_score, write_questions
from src.errors import DataError, PassageFileError
from src.metrics import has_answer

logger = logging.getLogger("fid")

# ---------------------------------------------------------------------------
# Passages by id, and writing
# ---------------------------------------------------------------------------


def open_passages(path: Path) -> PassageStore:
    require_file(path, "passages, DPR's psgs_w100.tsv layout: id<TAB>text<TAB>title")
    logger.info("passages: %s", path)
    try:
        store = PassageStore(path)
    except PassageFileError as e:
        raise DataError(str(e)) from None
    logger.info("passages: %d in %s", len(store), path)
    return store


class PassageLookup:
    """Passages by id; an unknown id is an error, or a counted skip with skip_missing."""

    def __init__(self, store: PassageStore, skip_missing: bool):
        self.store = store
        self.skip_missing = skip_missing
        self.missing = 0
        self.examples: set[str] = set()

    def get(self, pid: Any, question: str, position: str) -> dict | None:
        """`question` says where the question is, `position` where the id is within it (for errors)."""
        where = f"{question}, {position}"
        passage = self.store.get(normalize_passage_id(pid, where))
        if passage is None:
            if not self.skip_missing:
                raise DataError(
                    f"{where}: passage id {pid!r} is not in {self.store.path} "
                    "(wrong passages file? --skip_missing_passages drops such ids with a count)"
                )
            self.missing += 1
            self.examples.add(question)
        return passage

    def report(self, output: Path) -> None:
        if self.missing:
            logger.warning(
                "%s: skipped %d passage id(s) not in %s, in %d question(s)",
                output,
                self.missing,
                self.store.path,
                len(self.examples),
            )
        self.missing = 0
        self.examples = set()


def save(path: Path, examples: Iterable[dict]) -> int:
    """Write atomically, streaming (one question in memory at a time); returns the number of
    questions. An error half way leaves no output: write_questions writes a temporary file."""
    n = 0

    def counting() -> Iterator[dict]:
        nonlocal n
        for example in examples:
            n += 1
            yield example

    write_questions(path, counting())
    return n


# ---------------------------------------------------------------------------
# fid: the original recipe
# ---------------------------------------------------------------------------


def public_origin(split: str) -> str:
    """Train and dev are drawn from the public train file, test from the public dev file."""
    return "dev" if split == "test" else "train"


def fid_inputs(download_dir: Path, datasets: list[str], splits: list[str]) -> dict[str, Path]:
    """Where get-data.sh leaves each file (its tarballs unpack flat into DOWNLOAD_DIR)."""
    public = {
        "NQ": {"train": "NQ-open.train.jsonl", "dev": "NQ-open.dev.jsonl"},
        "TQA": {
            "train": "triviaqa-unfiltered/unfiltered-web-train.json",
            "dev": "triviaqa-unfiltered/unfiltered-web-dev.json",
        },
    }
    files = {}
    for name in datasets:
        for origin in sorted({public_origin(split) for split in splits}, reverse=True):
            files[f"{name} public {origin}"] = download_dir / public[name][origin]
        for split in splits:
            files[f"{name} {split} index"] = download_dir / f"{name}.{split}.idx.json"
            files[f"{name} {split} passages"] = download_dir / f"{name.lower()}_passages" / f"{split}.json"
    return files


def read_source(dataset: str, path: Path) -> list[tuple[str, dict]]:
    """The public question file, as (where, question) in file order; TriviaQA keeps its QuestionId."""
    records = iter_records(path)  # NQ-open: JSON lines (.jsonl), TriviaQA: {"Data": [...]}
    out = []
    for k, (where, record) in enumerate(tqdm(records, desc=f"reading {path.name}")):
        where = f"{path}, {where}"
        example = to_question(record, where, k)
        if dataset == "NQ":  # keep only what the recipe writes, as the original
            example = {"question": example["question"], "answers": example.get("answers")}
            if example["answers"] is None:
                raise DataError(f"{where}: NQ-open question without 'answer'")
        elif "QuestionId" not in record:
            raise DataError(f"{where}: TriviaQA record without QuestionId (the key of tqa_passages)")
        out.append((where, example))
    return out


def read_split_index(path: Path, n_source: int, source: Path) -> list[int]:
    index = read_json(path, "split index")
    if not isinstance(index, list):
        raise DataError(f"{path}: expected a JSON list of positions, got {type(index).__name__}")
    for i, k in enumerate(index):
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n_source:
            raise DataError(f"{path}, entry {i}: position {k!r} is not in 0..{n_source - 1} ({source})")
    return index


def fid_split(
    dataset: str,
    split: str,
    source: list[tuple[str, dict]],
    source_path: Path,
    files: dict[str, Path],
    lookup: PassageLookup,
) -> Iterator[dict]:
    """One split: questions picked by the index file, passages by the passage-id list.

    NQ's passage lists are keyed by position in the split ("0", "1", ...), TriviaQA's by
    QuestionId. Output ids: that same key (an int position for NQ, QuestionId for TQA).
    """
    index_path, lists_path = files[f"{dataset} {split} index"], files[f"{dataset} {split} passages"]
    index = read_split_index(index_path, len(source), source_path)
    passage_lists = read_json(lists_path, "passage-id lists")
    if not isinstance(passage_lists, dict):
        raise DataError(f"{lists_path}: expected an object question key -> list of passage ids")
    for i, k in enumerate(tqdm(index, desc=f"{dataset} {split}")):
        source_where, question = source[k]
        key = str(i) if dataset == "NQ" else question["id"]
        ids = passage_lists.get(key)
        if not isinstance(ids, list):
            raise DataError(
                f"{lists_path}: no passage-id list for question {key!r} ({dataset} {split} entry {i} = {source_where})"
            )
        ctxs = []
        for j, pid in enumerate(ids):
            passage = lookup.get(pid, f"{lists_path}, question {key!r}", f"passage {j}")
            if passage is not None:
                ctxs.append(passage)
        example = {"id": i if dataset == "NQ" else key, "question": question["question"]}
        if "target" in question:
            example["target"] = question["target"]
        example["answers"] = question["answers"]
        example["ctxs"] = ctxs
        yield example


def convert_fid(
    download_dir: Path,
    output_dir: Path,
    passages: str | None,
    datasets: list[str],
    splits: list[str],
    skip_missing: bool = False,
) -> None:
    """`preprocess.py fid`: OUTPUT_DIR/{NQ,TQA}/{train,dev,test}.json from what get-data.sh
    downloads (passages: OUTPUT_DIR/psgs_w100.tsv unless given, else DOWNLOAD_DIR's)."""
    files = fid_inputs(download_dir, datasets, splits)
    passages_path = Path(passages) if passages else output_dir / "psgs_w100.tsv"
    if not passages and not passages_path.is_file() and (download_dir / "psgs_w100.tsv").is_file():
        passages_path = download_dir / "psgs_w100.tsv"
    files["passages"] = passages_path
    missing = [f"  {path} ({what})" for what, path in files.items() if not path.is_file()]
    if missing:  # say everything that is missing before hours of work, not after
        raise DataError(
            f"{len(missing)} input file(s) missing for `preprocess.py fid` "
            "(layout of the original get-data.sh):\n" + "\n".join(missing)
        )
    lookup = PassageLookup(open_passages(passages_path), skip_missing)

    for dataset in datasets:
        public = {origin: files[f"{dataset} public {origin}"] for origin in map(public_origin, splits)}
        sources = {origin: read_source(dataset, path) for origin, path in public.items()}
        for split in splits:
            origin = public_origin(split)
            out = output_dir / dataset / f"{split}.json"
            n = save(out, fid_split(dataset, split, sources[origin], public[origin], files, lookup))
            lookup.report(out)
            logger.info("%s: %d questions (%s %s)", out, n, dataset, split)


# ---------------------------------------------------------------------------
# dpr: a DPR retriever output
# ---------------------------------------------------------------------------


def convert_dpr_example(
    record: Any, where: str, position: int, lookup: PassageLookup | None = None, n_docs: int = -1
) -> dict:
    """DPR -> ours: scores as floats, `has_answer` -> `hasanswer`, ids without `wiki:`.

    The ctx order is kept: it is DPR's ranking (best first). With a passages file, ids are
    checked and missing title/text filled in from it.
    """
    example = to_question(record, where, position)
    ctxs = example.get("ctxs")
    if not isinstance(ctxs, list):
        raise DataError(f"{where}: no 'ctxs' list (for files without passages use the `questions` mode)")
    if n_docs >= 0:
        ctxs = ctxs[:n_docs]
    converted = (convert_dpr_ctx(ctx, where, j, lookup) for j, ctx in enumerate(ctxs))
    example["ctxs"] = [ctx for ctx in converted if ctx is not None]
    return example


def convert_dpr_ctx(ctx: Any, where: str, j: int, lookup: PassageLookup | None) -> dict | None:
    """One DPR ctx -> ours (None: its id is not in the passages and --skip_missing_passages drops it)."""
    at = f"{where}, ctx {j}"
    if not isinstance(ctx, dict):
        raise DataError(f"{at}: expected an object, got {type(ctx).__name__}")
    out = {}
    if "id" in ctx:
        out["id"] = normalize_passage_id(ctx["id"], at)
    if lookup is not None:
        if "id" not in ctx:
            raise DataError(f"{at}: no 'id' to look up in {lookup.store.path}")
        passage = lookup.get(ctx["id"], where, f"ctx {j}")
        if passage is None:
            return None
        out["id"] = passage["id"]
        out["title"] = ctx.get("title", passage["title"])
        out["text"] = ctx.get("text", passage["text"])
    else:
        for field in ("title", "text"):
            if field not in ctx:
                raise DataError(f"{at}: no '{field}' (pass --passages to fill it in from the passages file)")
            out[field] = ctx[field]
    for field in ("title", "text"):
        if not isinstance(out[field], str):
            raise DataError(f"{at}: '{field}' must be a string")
    return {**out, **dpr_labels(ctx, at)}


def dpr_labels(ctx: dict, at: str) -> dict:
    """A ctx's score as a float, has_answer as `hasanswer`, and anything else DPR or a user added."""
    out = {}
    if "score" in ctx:
        out["score"] = parse_score(ctx["score"], at)
    hasanswer = ctx.get("hasanswer", ctx.get("has_answer"))
    if hasanswer is not None:
        if not isinstance(hasanswer, bool):
            raise DataError(f"{at}: has_answer must be true or false, got {hasanswer!r}")
        out["hasanswer"] = hasanswer
    for key, value in ctx.items():
        if key not in ("id", "title", "text", "score", "has_answer", "hasanswer"):
            out[key] = value
    return out


def convert_dpr(source: Path, output: Path, passages: str | None, n_docs: int = -1, skip_missing: bool = False) -> None:
    """`preprocess.py dpr`: a DPR retrieval output -> ours (ids checked against `passages` if given)."""
    lookup = PassageLookup(open_passages(Path(passages)), skip_missing) if passages else None
    records = iter_records(source, wrappers=())
    examples = (
        convert_dpr_example(record, f"{source}, {where}", k, lookup, n_docs)
        for k, (where, record) in enumerate(tqdm(records, desc=f"converting {source.name}"))
    )
    n = save(output, examples)
    if lookup is not None:
        lookup.report(output)
    logger.info("%s: %d questions from the DPR output %s", output, n, source)


def join_bm25(
    run_path: Path, questions_path: Path, passages: Path, output: Path, n_docs: int = 100, skip_missing: bool = False
) -> None:
    """`preprocess.py bm25`: a run joined with its questions and the passages (hasanswer by DPR's rule)."""
    questions = read_questions(questions_path)
    run = read_run(run_path, n_docs)
    lookup = PassageLookup(open_passages(passages), skip_missing)
    seen, no_hits = set(), 0

    def examples():
        nonlocal no_hits
        for example in tqdm(questions, desc="joining"):
            qid = str(example["id"])
            seen.add(qid)
            hits = run.get(qid)
            if not hits:
                no_hits += 1
            ctxs = []
            for rank, (pid, score) in enumerate(hits or []):
                passage = lookup.get(pid, f"{run_path}, question {qid!r}", f"rank {rank + 1}")
                if passage is None:
                    continue
                ctx = {**passage, "score": score}
                if example.get("answers"):  # DPR's rule, as passage_retrieval.py
                    ctx["hasanswer"] = bool(has_answer(example["answers"], passage["text"]))
                ctxs.append(ctx)
            yield {**example, "ctxs": ctxs}

    n = save(output, examples())
    lookup.report(output)
    if no_hits:
        logger.warning(
            "%s: %d of %d question(s) have no hits in %s (written with empty ctxs)", output, no_hits, n, run_path
        )
    unused = len(set(run) - seen)
    if unused:
        logger.warning("%s: %d question id(s) of the run are not in %s (ignored)", run_path, unused, questions_path)
    logger.info("%s: %d questions, run %s, questions %s", output, n, run_path, questions_path)


# ---------------------------------------------------------------------------
# questions: question files without passages
# ---------------------------------------------------------------------------


def convert_questions(source: Path, output: Path) -> None:
    """`preprocess.py questions`: question files without passages -> ours."""
    records = iter_question_records(source)
    examples = (
        to_question(record, f"{source}, {where}", k)
        for k, (where, record) in enumerate(tqdm(records, desc=f"converting {source.name}"))
    )
    n = save(output, examples)
    logger.info("%s: %d questions from %s", output, n, source)
