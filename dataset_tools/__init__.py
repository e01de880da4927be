"""dataset_tools: YouTube metadata -> thumbnails -> img2dataset-layout webdataset shards.

Subcommands (``python -m dataset_tools <cmd>``): build, inspect, finalize, split, vocab, dedup.
Downloads go through img2dataset (its Reader-free shard loop, resizer and distributors); this
package adds the YouTube pieces img2dataset lacks: a thumbnail variant ladder, placeholder
rejection, single-host politeness, sorted atomic shards and row-exact resume.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
