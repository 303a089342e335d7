"""Readers for foreign corpus formats that yield canonical rows (`pipelines.data.schema`) or `BadRow` records.

* `ofa_tsv`: OFA's TSV files (one example per line, base64 images), column layouts as in OFA's README and
  run scripts (`read_ofa_tsv_file`).
* `webdataset`: WebDataset tar shards (members grouped by key), streamed with `tarfile`
  (`read_webdataset_file`).
* `files`: what both read, a file or every matching file under a directory/prefix (`input_files`); a
  reader reads one of those files alone, with ids that do not depend on the other files, so files are
  converted in parallel (`pipelines.data.raw_convert`, one Ray task per file).
* `rows`: `BadRow`, `BadInput`, `make_row`, `image_format`, `clean_text`, `check_box`, shared with
  `pipelines.data.converters`.

Broken input never raises: each broken line/sample becomes one `BadRow` and reading goes on; a file that
cannot be opened or read to the end becomes one `BadRow` with reason "unreadable_shard". A location with
no input files at all, or an unknown layout/task, does raise: that is a caller error, not bad data.

Rows are normalised with `pipelines.data.schema.normalize_row` (every field present, float32-rounded floats),
so they hash and compare equal to what a canonical corpus reads back. Text has its whitespace runs
collapsed (`clean_text`) and is otherwise stored as written; prompt-specific cleaning belongs to the task
code. `task` is always a key of `ofa_model.tasks.TASKS`, label targets are words of its `labels`.
Bad-row reasons are the constants of `ofa_model.errors` (`pipelines.data.schema.BAD_REASONS`).
"""
