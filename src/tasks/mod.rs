//! Tasks: the GPT-2 tokenizer, dataset generators, importers of other tools' datasets, metrics.
