"""Retrieval recall@1/5/10 and zero-shot top-1 on the validation shards, computed on all ranks.

Each rank encodes its part of the validation set; features are gathered so every rank scores the
whole set. Under ZeRO-3 every forward is a collective (parameters are gathered on use), so all
ranks run the same number of forwards: a rank with fewer batches pads with repeats whose outputs
are dropped.

Every collective here runs on tensors of the engine's device (with NCCL a CPU tensor fails); the
features stay there and the metrics are computed there. `Evaluator` is the trainer's view: it
builds the validation batches and the zero-shot class list (read once per run) from the config.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vutrain.config import RunConfig
from vutrain.data.shards import ShardListError
from vutrain.distributed import all_reduce

log = logging.getLogger("vutrain")

RECALL_KS = (1, 5, 10)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate [n_r, D] tensors of different n_r from all ranks, in rank order, on x's device."""
    if _world() == 1:
        return x
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(_world())]
    dist.all_gather(sizes, n)
    sizes = torch.cat(sizes).tolist()  # one host read: the padded length is a shape
    longest = max(sizes)
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def gather_objects(items: list) -> list:
    """Concatenate picklable lists from all ranks, in rank order (object collective)."""
    if _world() == 1:
        return list(items)
    out = [None] * _world()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def gather_object_lists(*lists: list) -> tuple[list, ...]:
    """Each of ``lists`` concatenated over all ranks, in rank order (as ``gather_objects`` gives it),
    in one object collective: each such collective pickles and, with NCCL, copies through the
    device, so a ``gather_objects`` per list cost the eval that many of them."""
    if _world() == 1:
        return tuple(list(values) for values in lists)
    out = [None] * _world()
    dist.all_gather_object(out, lists)
    return tuple([x for part in out for x in part[column]] for column in range(len(lists)))


def read_on_first_rank(read, device):
    """``read()`` on rank 0 only, its result on every rank (object broadcast on ``device``).

    The zero-shot classes come from a pass over every validation shard: every rank made it, so 64
    ranks read a 2 GB held-out set 64 times at the first eval. An error on rank 0 is raised there,
    and on the other ranks as a RuntimeError naming it (they would wait in the broadcast forever)."""
    if _world() == 1:
        return read()
    box: list = [None]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            box = [("ok", read())]
        except Exception as e:  # sent to the other ranks, then raised here
            error, box = e, [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(box, src=0, device=torch.device(device))
    if error is not None:
        raise error
    status, value = box[0]
    if status != "ok":
        raise RuntimeError(f"rank 0 could not read the validation shards: {value}")
    return value


def _val_shard_view(spec: str) -> tuple:
    """This rank's validation shards as it sees them: ("shards", ((url, bytes), ...)), bytes -1
    for a remote URL; or ("error", a one-line message)."""
    from vutrain.data.shards import ShardListError, check_openable, expand_shards, is_remote

    try:
        shards = check_openable(expand_shards(spec, "data.val_shards"), "data.val_shards")
        return ("shards", tuple((url, -1 if is_remote(url) else os.path.getsize(url)) for url in shards))
    except ShardListError as e:
        return ("error", str(e))
    except OSError as e:  # a shard removed between the listing and its size
        return ("error", f"data.val_shards: {e.filename}: {e.strerror}")


def _fingerprint(view: tuple) -> int:
    """63-bit digest of a view: its negation fits an int64, so one MAX all-reduce gives both bounds."""
    return int.from_bytes(hashlib.blake2b(repr(view).encode(), digest_size=8).digest(), "little") >> 1


def _difference(rank: int, mine: tuple, first: tuple) -> str:
    """One clause on how this rank's view differs from rank 0's ("" when rank 0's clause says it)."""
    if mine[0] == "error":
        return f"rank {rank}: {mine[1]}"
    if rank == 0 or first[0] == "error" or mine == first:
        return ""
    ours, theirs = mine[1], first[1]
    if len(ours) != len(theirs):
        urls, urls0 = {url for url, _ in ours}, {url for url, _ in theirs}
        lacking = [url for url, _ in theirs if url not in urls]
        extra = [url for url, _ in ours if url not in urls0]
        detail = f", lacking {lacking[0]}" if lacking else f", with {extra[0]}" if extra else ""
        return f"rank {rank} sees {len(ours)} shards, rank 0 {len(theirs)}{detail}"
    (url, size), (url0, size0) = next((a, b) for a, b in zip(ours, theirs, strict=True) if a != b)
    if url != url0:
        return f"rank {rank} lists {url} where rank 0 lists {url0}"
    return f"rank {rank}: {url} is {size} bytes, {size0} on rank 0"


class ValShardsError(ShardListError):
    """A validation-shard problem raised on every rank alike (agree_on_val_shards): one rank says it."""


def agree_on_val_shards(spec: str, device) -> tuple:
    """Check, on every rank at once, that every rank sees the same validation shards (names and
    sizes), or raise ValShardsError (a ShardListError) on every rank naming what differs. Returns
    that view: ("shards", ((url, bytes), ...)), the same on every rank.

    A node whose local copy of the held-out set lacked a shard raised on that node only, while
    rank 0 waited in the zero-shot class broadcast until the group timeout (30 minutes); a
    truncated copy lost the shard's tail silently, and lists that differ (one node's missing shard
    accepted by data.allow_missing_shards) read some samples twice and others never."""
    view = _val_shard_view(spec)
    if _world() > 1:
        fingerprint = _fingerprint(view)
        bounds = torch.tensor([fingerprint, -fingerprint], dtype=torch.long, device=device)
        all_reduce(bounds, op=dist.ReduceOp.MAX)
        highest, lowest = bounds.tolist()  # one host read per eval: whether to go on at all
        if highest != -lowest:
            raise ValShardsError(_differences_line(view, device))
    if view[0] == "error":  # the same on every rank: each raises it, none waits
        raise ValShardsError(view[1])
    return view


def ranks_on_this_host() -> int:
    """How many ranks of the group run on this host (1 without a group): an object collective."""
    import socket

    hosts = gather_objects([socket.gethostname()])
    return max(1, hosts.count(socket.gethostname()))


def _differences_line(view: tuple, device) -> str:
    first = [view if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(first, src=0, device=torch.device(device))
    clauses = [c for c in gather_objects([_difference(dist.get_rank(), view, first[0])]) if c]
    shown = "; ".join(clauses[:3]) + (f"; and {len(clauses) - 3} more ranks" if len(clauses) > 3 else "")
    return (
        f"data.val_shards differ between ranks ({shown}), so their parts would not make up the "
        "held-out set. Give every node the same copy of the shards, or point data.val_shards at "
        "storage that every node reads."
    )


RECALL_CHUNK_ELEMENTS = 2**26
"""Similarities scored at a time in retrieval recall (256 MB in fp32, with a few boolean
temporaries of the same shape): at 50k held-out samples the whole N x N matrix was 10 GB."""

RECALL_CHUNK_PAIRS = 2**22
"""Right (row, column) pairs looked at a time in retrieval recall (some 50 bytes each, about as much
memory as the similarities): a caption shared by most of the set makes ~N right columns per row."""


def _chunk_rows(n_columns: int) -> int:
    return max(1, min(4096, RECALL_CHUNK_ELEMENTS // max(n_columns, 1)))


MISS_RANK = torch.iinfo(torch.long).max
"""The rank of a pair that is never found (every right column NaN): beyond every k. It was N, so
on a held-out set of fewer than 10 samples a diverged model's misses counted as hits at R@10."""


def _pair_ranks(rows: torch.Tensor, pair_row: torch.Tensor, pair_col: torch.Tensor) -> torch.Tensor:
    """Per row of ``rows`` [n, N], how many wrong columns beat or tie its best right column (the
    right ones: the pairs ``(pair_row[p], pair_col[p])``, distinct); ``MISS_RANK`` when every right
    column is NaN.

    Counted as all columns not below the best (a NaN is not below it: it beats every pair) less
    the right ones among them, so no [n, N] mask of the right columns is made."""
    values = rows[pair_row, pair_col]
    scored = ~values.isnan()
    best = rows.new_full((rows.shape[0],), float("-inf"))
    best = best.scatter_reduce(0, pair_row[scored], values[scored], reduce="amax")
    found = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    found[pair_row[scored]] = True
    not_below = rows.shape[1] - (rows < best[:, None]).sum(dim=1)
    right_not_below = torch.zeros_like(not_below).index_add_(0, pair_row, (~(values < best[pair_row])).long())
    return torch.where(found, not_below - right_not_below, MISS_RANK)


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner, position): for each i, ``counts[i]`` entries ``starts[i], starts[i] + 1, ...``,
    concatenated; owner is i for each."""
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts  # where each i's entries begin in the output
    return owner, starts[owner] + torch.arange(len(owner), device=counts.device) - first[owner]


class RightColumns:
    """Which columns are right for which rows, from per-sample groups: row i's right columns are
    those j whose key group some sample pairs with row i's query group (``query_groups[k] ==
    query_groups[i]`` and ``key_groups[k] == key_groups[j]`` for some k).

    i2t: query = image group, key = caption group, so an image's right captions are the captions of
    its copies. Equal query and key groups (one group per sample, or the caption groups) make it
    "the same group". A transitive group was wrong: image A reused by B, B's title also C's, made
    C's image right for A's title (neither its image nor its caption).

    Indexed once (query group -> its key groups -> their columns), so a block of rows finds its
    right columns in time of the block and its pairs: a scan of every link per block of rows, and
    a [block, N] table, cost some 4 minutes of a 50k-sample eval."""

    def __init__(self, query_groups: torch.Tensor, key_groups: torch.Tensor):
        # ids made 0..Q-1 and 0..K-1: the index is Q and K long, whatever ids the caller gave
        self.query_groups = torch.unique(query_groups, return_inverse=True)[1]
        self.key_groups = torch.unique(key_groups, return_inverse=True)[1]
        n_query = int(self.query_groups.max().item()) + 1 if query_groups.numel() else 0
        n_key = int(self.key_groups.max().item()) + 1 if key_groups.numel() else 0
        links = torch.unique(torch.stack([self.query_groups, self.key_groups], dim=1), dim=0)  # by query
        self.link_key = links[:, 1]
        self.link_count = torch.bincount(links[:, 0], minlength=n_query)
        self.link_start = torch.cumsum(self.link_count, 0) - self.link_count
        self.columns_by_key = torch.argsort(self.key_groups, stable=True)  # each key group's, in order
        self.column_count = torch.bincount(self.key_groups, minlength=n_key)
        self.column_start = torch.cumsum(self.column_count, 0) - self.column_count
        # per query group, how many right columns a row of it has
        self.right_count = torch.zeros_like(self.link_count).index_add_(
            0, links[:, 0], self.column_count[self.link_key]
        )

    def pairs_of_rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row - start, column) LongTensors [P]: the right pairs of rows [start, stop), each once."""
        query = self.query_groups[start:stop]
        link_row, link = _ranges(self.link_start[query], self.link_count[query])
        key = self.link_key[link]
        key_link, position = _ranges(self.column_start[key], self.column_count[key])
        return link_row[key_link], self.columns_by_key[position]

    def pieces(self, start: int, stop: int, max_pairs: int) -> list[tuple[int, int]]:
        """[start, stop) cut into runs of rows with about ``max_pairs`` right pairs at most (a run
        goes over by less than one row's pairs); one run unless many rows share a big group."""
        counts = self.right_count[self.query_groups[start:stop]]
        if int(counts.sum().item()) <= max_pairs:
            return [(start, stop)]
        run = torch.div(torch.cumsum(counts, 0) - counts, max(max_pairs, 1), rounding_mode="floor")
        sizes = torch.unique_consecutive(run, return_counts=True)[1].tolist()
        ends = [start + s for s in itertools.accumulate(sizes)]
        return list(zip([start] + ends[:-1], ends, strict=True))

    def of_rows(self, start: int, stop: int) -> torch.Tensor:
        """BoolTensor [stop - start, N]: the right columns of rows [start, stop) as a mask."""
        out = torch.zeros(stop - start, len(self.key_groups), dtype=torch.bool, device=self.key_groups.device)
        out[self.pairs_of_rows(start, stop)] = True
        return out

    def ranks(self, rows: torch.Tensor, start: int) -> torch.Tensor:
        """``_pair_ranks`` of ``rows`` [n, N], the similarities of rows [start, start + n)."""
        parts = [
            _pair_ranks(rows[a - start : b - start], *self.pairs_of_rows(a, b))
            for a, b in self.pieces(start, start + rows.shape[0], RECALL_CHUNK_PAIRS)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=rows.device)


def _right_columns(n: int, groups, key_groups, device) -> RightColumns:
    groups = torch.arange(n, device=device) if groups is None else groups.to(device)
    return RightColumns(groups, groups if key_groups is None else key_groups.to(device))


def _recall(ranks: list[torch.Tensor], ks, device) -> dict[int, float]:
    rank = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=device)
    return {k: (rank < k).float().mean().item() for k in ks}


def recall_at_k(
    sim: torch.Tensor,
    ks=RECALL_KS,
    groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
) -> dict[int, float]:
    """sim: [N, N], the pair of row i is column i. Fraction of rows whose pair ranks within the top k.

    groups: [N] caption ids (equal for identical captions): a column of the row's group is as
    right as the pair itself (the same caption retrieved, or an image of that caption), so the row
    counts its best-scoring one and the others do not compete. Without it, each row has one.
    key_groups: [N], the columns' groups when they differ from the rows' (``groups`` then the rows'):
    column j is right for row i when some sample k has groups[k] == groups[i] and key_groups[k] ==
    key_groups[j] (``RightColumns``; i2t: image groups for the rows, caption groups for the columns).

    A column that ties the true pair ranks before it: a collapsed model (every embedding equal)
    scores k / N, not 1.0. NaN counts against the model too: a NaN column beats every pair, a NaN
    pair is a miss (a comparison with NaN is False, so a diverged model's all-NaN similarities
    scored recall 1.0).
    """
    n = sim.shape[0]
    right = _right_columns(n, groups, key_groups, sim.device)
    step = _chunk_rows(n)  # rows in chunks: a few [chunk, N] temporaries, never [N, N] ones
    ranks = [right.ranks(sim[i : i + step], i) for i in range(0, n, step)]
    return _recall(ranks, ks, sim.device)


def feature_recall_at_k(
    queries: torch.Tensor,
    keys: torch.Tensor,
    ks=RECALL_KS,
    groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
) -> dict[int, float]:
    """``recall_at_k(queries @ keys.T)`` without the [N, N] matrix: the similarities are made a
    chunk of rows at a time, so memory grows with N, not N squared."""
    n = queries.shape[0]
    right = _right_columns(n, groups, key_groups, queries.device)
    step = _chunk_rows(n)
    ranks = [right.ranks(queries[i : i + step] @ keys.T, i) for i in range(0, n, step)]
    return _recall(ranks, ks, queries.device)


ONE_PASS_MAX_K = 100
"""The largest k that ``paired_recall_at_k`` scores in one pass: each column keeps its max(ks) best
wrong scores ([max(ks), N]); a larger k is scored in two passes (``feature_recall_at_k`` twice)."""


class _ColumnRanks:
    """The t2i ranks of the columns of image x text similarities, gathered from its row blocks in turn.

    A column's rank (``_pair_ranks`` of the transposed matrix) needs its best right score, known
    only after the last block; so each column keeps its ``keep`` highest wrong scores instead, and
    counts at the end those not below that best. That is the rank up to ``keep``, which is all a
    recall at k <= ``keep`` reads: when fewer than ``keep`` wrong scores reach the best, all of them
    are among the kept ones."""

    def __init__(self, n_rows: int, n_columns: int, keep: int, device):
        self.n_rows, self.keep = n_rows, keep
        self.best = torch.full((n_columns,), float("-inf"), device=device)
        self.found = torch.zeros(n_columns, dtype=torch.bool, device=device)
        self.right = torch.zeros(n_columns, dtype=torch.long, device=device)
        self.top = torch.zeros(0, n_columns, device=device)

    def add(self, rows: torch.Tensor, pair_row: torch.Tensor, pair_col: torch.Tensor) -> None:
        """Count a block ``rows`` [n, N] (overwritten) whose right pairs are ``(pair_row, pair_col)``."""
        values = rows[pair_row, pair_col]
        scored = ~values.isnan()
        self.best.scatter_reduce_(0, pair_col[scored], values[scored], reduce="amax")
        self.found[pair_col[scored]] = True
        self.right.index_add_(0, pair_col, torch.ones_like(pair_col))
        # A right score is no rival: -inf never reaches a best above -inf (a best of -inf: ranks()).
        rows[pair_row, pair_col] = float("-inf")
        rows.masked_fill_(rows.isnan(), float("inf"))  # a NaN beats every pair, as +inf does
        kept = rows.topk(min(self.keep, rows.shape[0]), dim=0).values
        both = torch.cat([self.top, kept])
        self.top = both.topk(min(self.keep, both.shape[0]), dim=0).values

    def ranks(self) -> torch.Tensor:
        """[N]: per column, its rank capped at ``keep``; ``MISS_RANK`` when every right score is NaN."""
        beaten = (~(self.top < self.best)).sum(dim=0)
        # A best of -inf: every wrong row ties it, -inf or not (none of them is among the kept).
        every_wrong = self.n_rows - self.right
        ranks = torch.where(self.best == float("-inf"), every_wrong, beaten)
        return torch.where(self.found, ranks, MISS_RANK)


def paired_recall_at_k(
    images: torch.Tensor,
    texts: torch.Tensor,
    ks=RECALL_KS,
    image_groups: torch.Tensor | None = None,
    caption_groups: torch.Tensor | None = None,
) -> tuple[dict[int, float], dict[int, float]]:
    """(i2t, t2i): ``feature_recall_at_k(images, texts, ks, image_groups, caption_groups)`` and
    ``feature_recall_at_k(texts, images, ks, caption_groups, image_groups)``, equal to them, from
    one pass over the image x text similarities (a block of image rows at a time).

    The two directions each made the whole N x N product and ranked it: at 50k held-out samples
    twice 1.3 TFLOP of similarities. Image i is right for text j exactly when text j is right for
    image i, so the t2i ranks are the columns' (``_ColumnRanks``)."""
    t2i_rows = caption_groups if caption_groups is not None else image_groups
    if not ks or max(ks) > ONE_PASS_MAX_K:
        return (
            feature_recall_at_k(images, texts, ks, image_groups, caption_groups),
            feature_recall_at_k(texts, images, ks, t2i_rows, image_groups),
        )
    n, device = images.shape[0], images.device
    right = _right_columns(n, image_groups, caption_groups, device)
    columns = _ColumnRanks(n, texts.shape[0], max(ks), device)
    i2t = []
    step = _chunk_rows(n)
    for start in range(0, n, step):
        block = images[start : start + step] @ texts.T
        for a, b in right.pieces(start, start + block.shape[0], RECALL_CHUNK_PAIRS):
            rows, (pair_row, pair_col) = block[a - start : b - start], right.pairs_of_rows(a, b)
            i2t.append(_pair_ranks(rows, pair_row, pair_col))
            columns.add(rows, pair_row, pair_col)  # after the row ranks: it overwrites the rows
    return _recall(i2t, ks, device), _recall([columns.ranks()], ks, device)


def _zero_shot_block_hits(scores: torch.Tensor, label_columns: list[list[int]]) -> torch.Tensor:
    """[n] bool: row i of ``scores`` [n, C] ranks one of its classes ``label_columns[i]`` strictly
    above every other class, with no NaN in the row."""
    pairs = [(r, col) for r, cols in enumerate(label_columns) for col in cols]
    rows, cols = torch.tensor(pairs, device=scores.device).T  # (sample, one of its classes)
    # Ties count against the model, as in recall: argmax took the first of tied classes, so a
    # collapsed model hit every sample of the alphabetically first one. A NaN is never a lucky hit.
    valid = ~scores.isnan().any(dim=1)
    best_label = scores.new_full((scores.shape[0],), float("-inf"))
    best_label = best_label.scatter_reduce(0, rows, scores[rows, cols], reduce="amax")
    scores[rows, cols] = float("-inf")
    return valid & (best_label > scores.amax(dim=1))


def zero_shot_hits(
    image_features: torch.Tensor, class_emb: torch.Tensor, rows: list[int], label_columns: list[list[int]]
) -> int:
    """Zero-shot hits of images ``rows`` of ``image_features`` [N, E] against ``class_emb`` [C, E]
    (``label_columns[j]``: the classes of image ``rows[j]``, at least one).

    Scored a chunk of images at a time: the whole [N, C] score matrix was 4 GB at 50k validation
    images and 20k classes (``eval.zeroshot_field=tags``), on the GPU beside the model."""
    step = _chunk_rows(class_emb.shape[0])
    hits = torch.zeros((), dtype=torch.long, device=image_features.device)
    for start in range(0, len(rows), step):
        chunk = torch.tensor(rows[start : start + step], device=image_features.device)
        scores = image_features[chunk] @ class_emb.T
        hits += _zero_shot_block_hits(scores, label_columns[start : start + step]).sum()
    return int(hits.item())  # one host read for the whole set, not one per chunk


def caption_tokens(batch: dict) -> list[tuple[int, ...]]:
    """Per sample of ``batch``, its caption's attended token ids: equal for identical captions."""
    ids = batch["input_ids"].tolist()
    mask = batch.get("attention_mask")
    masks = mask.tolist() if mask is not None else [[1] * len(row) for row in ids]
    return [
        tuple(t for t, m in zip(row, keep, strict=True) if m) for row, keep in zip(ids, masks, strict=True)
    ]


def retrieval_pair_groups(tokens: list[tuple], image_ids: list) -> tuple[list[int], list[int]]:
    """Per sample, (its image group, its caption group): samples of an identical image (the same
    ``image_ids`` entry; None is an image of its own) share an image group, samples of an identical
    caption (the same tokens) a caption group. Recall pairs them through ``RightColumns``."""
    image_group: dict = {}
    caption_group: dict = {}
    images = [
        image_group.setdefault(("id", i) if i is not None else ("own", n), len(image_group))
        for n, i in enumerate(image_ids)
    ]
    captions = [caption_group.setdefault(t, len(caption_group)) for t in tokens]
    return images, captions


def repeated_samples(
    image_ids: list, tokens: list, labels: list, tags: list, video_ids: list | None = None
) -> list[int]:
    """Indices of the samples that repeat an earlier one in every field a metric reads: the same
    image (``image_ids``, its bytes; or ``video_ids``, the video it shows; None repeats nothing),
    caption tokens, labels and tags (``tags`` may be empty: not gathered).

    The same video in two validation shards was scored twice: its pair weighted double, and as a
    wrong column it beat other rows twice (i2t R@1 0.67 -> 0.75 and R@2 1.0 -> 0.75 on a 3-sample
    set with one video copied). A copy tells the metrics nothing its first does not."""
    return [i for i, _ in _repeats(image_ids, tokens, labels, tags, video_ids)]


def _repeats(image_ids: list, tokens: list, labels: list, tags: list, video_ids: list | None) -> list[tuple]:
    """``repeated_samples`` as (index, whether its image bytes differ from every earlier copy's).

    By video as well as by bytes: a shard rebuilt at another thumbnail size holds the same videos
    re-encoded (other bytes, the same video_id), so a set holding both scored each video twice."""
    video_ids = video_ids if video_ids is not None else [None] * len(image_ids)
    seen: set = set()
    copies = []
    for i, (image, video, caption, labs) in enumerate(zip(image_ids, video_ids, tokens, labels, strict=True)):
        rest = (caption, frozenset(labs), tuple(tags[i]) if tags else ())
        by_image = ("image", image, *rest) if image is not None else None
        by_video = ("video", video, *rest) if video is not None else None
        if by_image in seen or by_video in seen:
            copies.append((i, by_image not in seen))
        seen.update(k for k in (by_image, by_video) if k is not None)
    return copies


def _without(drop: list[int], img: torch.Tensor, txt: torch.Tensor, *lists: list) -> tuple:
    """(img, txt, *lists) without the samples ``drop``; an empty list (tags not gathered) stays empty."""
    dropped = set(drop)
    keep = [i for i in range(img.shape[0]) if i not in dropped]
    rows = torch.tensor(keep, dtype=torch.long, device=img.device)
    kept_lists = ([values[i] for i in keep] if values else values for values in lists)
    return (img[rows], txt[rows], *kept_lists)


def _warn_copies(count: int, reencoded: int) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.warning(
            "eval: %d validation sample(s) repeat an earlier one (the same caption, labels and tags, and "
            "the same image bytes or the same video_id/url: one video in two shards?), %d of them with "
            "other image bytes (a shard rebuilt at another thumbnail size?); each video is scored once "
            "(eval/duplicate_samples). List them with `python -m dataset_tools dedup DIR`.",
            count,
            reencoded,
        )


def sample_fields(batch: dict) -> dict[str, list]:
    """Per sample of ``batch``, what the metrics read once its features are computed: its labels,
    tags, caption tokens and image id. No tensor of the batch is kept (its pixels above all)."""
    n = len(batch["labels"])
    return dict(
        labels=[
            set(batch["label_sets"][i]) if "label_sets" in batch else {lab}
            for i, lab in enumerate(batch["labels"])
        ],
        tags=list(batch.get("tags", [[]] * n)),
        tokens=caption_tokens(batch),  # identical captions: one group in recall
        image_ids=list(batch.get("image_ids", [None] * n)),
        video_ids=list(batch.get("video_ids", [None] * n)),  # re-encoded copies: one video
    )


class EvalInterrupted(Exception):
    """Every rank agreed, between two eval batches, to stop: a rank got a pre-emption signal."""


class EvalFailedOnAnotherRank(RuntimeError):
    """Raised by every rank whose eval was fine when another rank's eval failed (``_lockstep``)."""


def _pull(it) -> tuple[object, Exception | None]:
    """(next batch or None at the end, None) or (None, the error the pull raised)."""
    try:
        return next(it, None), None
    except Exception as e:  # told to the other ranks at this step's agreement, then raised here
        return None, e


def _one_line(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _raise_eval_failure(failure: Exception | None) -> None:
    """Every rank, once some rank's eval failed: the failing ranks re-raise their own error, the
    others an EvalFailedOnAnotherRank naming them (one object gather: once per failed eval)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    lines = gather_objects([f"rank {rank}: {_one_line(failure)}"] if failure is not None else [])
    if failure is not None:
        raise failure
    shown = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more ranks" if len(lines) > 3 else "")
    raise EvalFailedOnAnotherRank(
        f"the eval stopped on every rank because another rank's eval failed ({shown}); that rank's "
        "log has the traceback. Fix its cause (an unreadable validation shard, a loader worker killed "
        "for memory, an out-of-memory forward) and run again."
    )


def forwards_gather_parameters(engine) -> bool:
    """Whether a forward of ``engine`` gathers its parameters from the other ranks (ZeRO-3, more
    than one rank): then the forward is a sequence of collectives itself."""
    partitioned = getattr(engine, "zero_optimization_partition_weights", None)  # DeepSpeed engines only
    return _world() > 1 and callable(partitioned) and bool(partitioned())


ZERO3_FORWARD_FAILED_NOTE = (
    "This rank's eval forward raised under ZeRO-3, where every forward gathers the parameters from "
    "all ranks: this rank stopped at once, and the other ranks wait in that forward's gather until "
    "the launcher ends the job or the process group's timeout (VUTRAIN_DIST_TIMEOUT_MIN, 30 minutes "
    "unless set) ends them. Fix this error (e.g. the preprocessing's image size, an out-of-memory batch)."
)


def _lockstep(
    batches, run, device, stop_requested=None, keep=lambda batch: None, forward_is_collective: bool = False
) -> tuple[list, list]:
    """Run `run(batch)` over this rank's batches while any rank still has one: (outputs, `keep(batch)`
    of each). Only what `keep` picks outlives its batch: kept whole, every batch's pixels stayed in
    host memory until the eval ended (~30 GB per rank for a 50k-sample val set at 224 px).

    Ranks whose own batches ran out call `run(None)` (a dummy) and drop the output, so every rank
    makes the same number of forwards (a ZeRO-3 forward is a collective). One tiny all-reduce per
    batch decides when all ranks are done, without knowing the counts in advance, and whether any
    rank's `stop_requested()` holds: then every rank raises EvalInterrupted at the same batch (an
    eval of a large held-out set outlasted SLURM's warning, and the job was killed without its
    pre-emption checkpoint).

    The same all-reduce says whether a rank's batch pull or forward raised: then that rank re-raises
    its error and every other rank raises EvalFailedOnAnotherRank naming it, at the same step. A
    rank whose shard or loader worker failed used to leave the others waiting in this all-reduce
    until the launcher or the group timeout (30 minutes) ended them.

    With ``forward_is_collective`` (ZeRO-3: `run` gathers parameters from every rank), an error that
    `run` raises is re-raised at once: the others are inside that forward's gathers, and this
    rank's flag all-reduce paired with one of them, so both ranks waited until the group timeout and
    the failing rank ended with a timeout instead of its error. The others stay in their gather
    until the launcher ends the job (this rank exits) or the group timeout.
    """
    it, outs, kept = iter(batches), [], []
    failure: Exception | None = None
    while True:
        batch, failure = _pull(it) if failure is None else (None, failure)
        stop = bool(stop_requested and stop_requested())
        flags = torch.tensor(
            [0 if batch is None else 1, int(stop), int(failure is not None)], dtype=torch.long, device=device
        )
        all_reduce(flags, op=dist.ReduceOp.MAX)
        more, stop, failed = flags.tolist()  # host read per eval batch: the loop condition itself
        if failed:  # before the stop: a rank that failed cannot join the pre-emption checkpoint
            _raise_eval_failure(failure)
        if stop:
            raise EvalInterrupted
        if not more:
            return outs, kept
        try:
            out = run(batch)
        except Exception as e:  # told to the others at the next step's agreement (not under ZeRO-3)
            if forward_is_collective:  # the others are in this forward's gathers: no flag reaches them
                e.add_note(ZERO3_FORWARD_FAILED_NOTE)
                raise
            failure = e
            continue
        if batch is not None:
            outs.append(out)
            kept.append(keep(batch))


MERGE_CHUNK_CLASSES = 256
"""Classes whose prompts are tokenised at a time when merging them."""


def merge_same_prompts(
    classes: list[str], templates: list[str], tokenize, max_distinct: int | None = None
) -> tuple[list[str], dict[str, int]]:
    """The classes whose prompts the model cannot tell apart, merged: (distinct, index of each class).

    Two classes whose prompts tokenise alike for every template ("Minecraft" and "minecraft" under
    CLIP's lower-casing tokenizer, common among tags) have one embedding, so they tied exactly and
    neither was ever a hit, even for a perfect model. Each merged class keeps its first spelling.

    max_distinct: ``distinct`` is the first ``max_distinct`` distinct classes of ``classes`` in
    order; a later class is indexed only where it merges into one of them (``_onto_kept``).

    The merges of the two latest class lists are kept: the zero-shot classes and the tag vocabulary
    of an eval set are the same at every eval of a run, and tokenising 10^5 distinct tags took
    seconds per eval (``tokenize`` must be hashable: a function or ``functools.partial``).
    """
    distinct, index = _merged_prompts(tuple(classes), tuple(templates), tokenize, max_distinct)
    return list(distinct), dict(index)  # copies: the cached ones outlive the caller


@functools.lru_cache(maxsize=2)  # the zero-shot classes and the tag vocabulary, merged in turn each eval
def _merged_prompts(
    classes: tuple[str, ...], templates: tuple[str, ...], tokenize, max_distinct: int | None
) -> tuple[list[str], dict[str, int]]:
    """``merge_same_prompts``, uncached."""
    templates = list(templates)
    first: dict[tuple, int] = {}
    distinct: list[str] = []
    index: dict[str, int] = {}
    for start in range(0, len(classes), MERGE_CHUNK_CLASSES):
        chunk = classes[start : start + MERGE_CHUNK_CLASSES]
        keys = _prompt_tokens(chunk, templates, tokenize)
        for offset, (c, key) in enumerate(zip(chunk, keys, strict=True)):
            if key not in first:
                if max_distinct is not None and len(distinct) == max_distinct:
                    index.update(_onto_kept(classes[start + offset + 1 :], first, templates, tokenize))
                    return distinct, index
                first[key] = len(distinct)
                distinct.append(c)
            index[c] = first[key]
    return distinct, index


def _onto_kept(
    classes: tuple[str, ...], kept: dict[tuple, int], templates: list[str], tokenize
) -> dict[str, int]:
    """The classes past the cut whose prompts tokenise like a kept class's (``kept``: prompt tokens
    -> distinct index), each to that index; the others are left out.

    A rare tag cut alike at the context length with a kept one ("... part 1" and "... part 2"), or
    spelled apart only where the tokenizer normalises, has the kept tag's embedding: left out, its
    images were negatives of a tag the model cannot tell from their own. Every class past the cut
    is tokenised with the first template only (one prompt each, not one per template); only those
    that match a kept class there, a few, are tokenised with them all."""
    heads = {key[0] for key in kept}
    out: dict[str, int] = {}
    step = MERGE_CHUNK_CLASSES * len(templates)  # as many prompts per call as the merge above
    for start in range(0, len(classes), step):
        chunk = classes[start : start + step]
        first_prompts = caption_tokens(tokenize([templates[0].format(c) for c in chunk]))
        maybe = [c for c, head in zip(chunk, first_prompts, strict=True) if head in heads]
        for c, key in zip(maybe, _prompt_tokens(maybe, templates, tokenize) if maybe else [], strict=True):
            if key in kept:
                out[c] = kept[key]
    return out


def _prompt_tokens(classes: list[str], templates: list[str], tokenize) -> list[tuple]:
    """Per class, the attended tokens of each of its prompts."""
    tokens = caption_tokens(tokenize([t.format(c) for c in classes for t in templates]))
    per_class = len(templates)
    return [tuple(tokens[j * per_class : (j + 1) * per_class]) for j in range(len(classes))]


def merge_same_prompt_tags(
    tag_lists: list[list[str]], vocab: list[str], templates: list[str], tokenize, max_tags: int | None = None
) -> tuple[list[list[str]], list[str]]:
    """The vocabulary tags whose prompts the model cannot tell apart, merged as zero-shot classes
    are (``merge_same_prompts``): (each image's tags renamed to its merged tag, merged vocabulary).

    "gta5" and "gta 5" (CLIP's tokenizer splits digits from letters) or two long tags cut alike at
    the context length had one embedding, so for an image of one, the other tied its true tag and
    ranked first: a perfect model lost R@1 on every such image and AP on every such tag.

    max_tags: the merged vocabulary is the first ``max_tags`` distinct tags of ``vocab`` (most
    frequent first): cut before the merge, each merge cost the vocabulary a tag. A rarer tag past
    the cut is still renamed to the vocabulary tag it tokenises like (``merge_same_prompts``)."""
    from vutrain.eval_multilabel import normalized_tag  # memoised: the same tags at every eval

    distinct, index = merge_same_prompts(vocab, templates, tokenize, max_distinct=max_tags)
    merged_name = {tag: distinct[i] for tag, i in index.items()}
    renamed = [[merged_name.get(normalized_tag(t), t) for t in tags] for tags in tag_lists]
    return renamed, distinct


def tag_metrics(
    img, tag_lists, encode_text, templates, tokenize, vocab_size: int, image_groups: list[int] | None = None
) -> dict[str, float]:
    """``eval/tags_*`` over the ``vocab_size`` most frequent tags, merged by prompt tokens;
    ``eval/tags_vocab`` counts merged tags. image_groups: per image, its group of identical images
    (``retrieval_pair_groups``), whose tags are one set (the vocabulary still counts videos)."""
    from vutrain.eval_multilabel import multilabel_retrieval

    groups = tuple(image_groups) if image_groups is not None else None
    key = (tuple(tuple(tags) for tags in tag_lists), tuple(templates), tokenize, vocab_size, groups)
    tag_lists, vocab, pairs = _prepared_tags(*key)
    return multilabel_retrieval(img, tag_lists, encode_text, templates, vocab=list(vocab), pairs=pairs)


@functools.lru_cache(maxsize=1)  # the held-out set's tags are the same at every eval of a run
def _prepared_tags(
    tag_lists: tuple[tuple[str, ...], ...],
    templates: tuple[str, ...],
    tokenize,
    vocab_size: int,
    image_groups: tuple[int, ...] | None,
) -> tuple[list[list[str]], list[str], torch.Tensor]:
    """(tag lists renamed and united over copies, merged vocabulary, their target pairs) of one
    eval set: ``tag_metrics``'s preparation, which read all ~450k tags of a 50k-sample set three
    times at every eval. Keyed by everything it reads, so another set (or the same tags on other
    images) is prepared anew."""
    from vutrain.eval_multilabel import tag_vocabulary, target_pairs

    ranked = tag_vocabulary(tag_lists)  # every tag, most frequent first: the merge decides the cut
    lists, vocab = merge_same_prompt_tags(tag_lists, ranked, list(templates), tokenize, max_tags=vocab_size)
    if image_groups is not None:
        # A thumbnail reused by a "cat" video and a "dog" video is one image: a negative copy
        # tied each positive one, so a perfect model lost AP and R@1 on both tags.
        lists = union_over_copies(lists, list(image_groups))
    return lists, vocab, target_pairs(lists, vocab)


def union_over_copies(values: list, image_groups: list[int]) -> list[list]:
    """Per sample, the values (an iterable each) of every sample of its image group, first seen first."""
    merged: dict[int, dict] = {}
    for group, items in zip(image_groups, values, strict=True):
        merged.setdefault(group, {}).update(dict.fromkeys(items))
    return [list(merged[group]) for group in image_groups]


@torch.no_grad()
def class_embeddings(encode_text, classes: list[str], templates: list[str]) -> torch.Tensor:
    """[C, E]: per class, the normalised mean of its normalised prompt embeddings."""
    prompts = [t.format(c) for c in classes for t in templates]
    feats = encode_text(prompts).float().reshape(len(classes), len(templates), -1)
    return F.normalize(F.normalize(feats, dim=-1).mean(dim=1), dim=-1)


@torch.no_grad()
def evaluate(
    engine,
    val_batches,
    classes: list[str],
    templates: list[str],
    tokenize,
    input_dtype: torch.dtype,
    device,
    dummy_batch: dict,
    tag_vocab_size: int = 0,
    stop_requested=None,
    scored_classes_only: bool = False,
) -> dict[str, float]:
    """Recall, zero-shot and (with tag_vocab_size) multi-label tag metrics over every rank's batches.

    val_batches: iterable of this rank's batches (pixel_values, input_ids, attention_mask, labels,
    and optionally tags). tokenize(list[str]) -> dict(input_ids, attention_mask).
    tag_vocab_size: rank images against the most frequent validation tags (eval_multilabel.py).
    stop_requested: () -> bool, asked before each batch; EvalInterrupted when any rank's holds.
    scored_classes_only: the zero-shot candidates are those of ``classes`` that some evaluated
    sample carries (``Evaluator``: its list is read from every sample's metadata, unreadable ones too).
    """
    was_training = engine.module.training
    engine.eval()
    try:

        def run(batch):
            batch = batch if batch is not None else dummy_batch
            img, txt, _, _ = engine(
                pixel_values=batch["pixel_values"].to(device, input_dtype),
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            )
            # Copies: under train.compile_scope=model with CUDA graphs (reduce-overhead), every
            # no-grad call replays into the same static output memory, so a kept output would
            # become the next batch's features (or raise "overwritten by a subsequent run").
            return img.to(torch.float32, copy=True), txt.to(torch.float32, copy=True)

        outs, kept = _lockstep(
            val_batches,
            run,
            device,
            stop_requested,
            keep=sample_fields,
            forward_is_collective=forwards_gather_parameters(engine),
        )
        dim = engine.module.base.config.projection_dim
        img = torch.cat([o[0] for o in outs]) if outs else torch.zeros(0, dim, device=device)
        txt = torch.cat([o[1] for o in outs]) if outs else torch.zeros(0, dim, device=device)
        labels, tags, tokens, image_ids, video_ids = (
            [v for b in kept for v in b[field]]
            for field in ("labels", "tags", "tokens", "image_ids", "video_ids")
        )
        img, txt = gather_rows(img), gather_rows(txt)
        # The tags are sent only when they are scored.
        labels, tokens, image_ids, video_ids, tags = gather_object_lists(
            labels, tokens, image_ids, video_ids, tags if tag_vocab_size > 0 else []
        )
        repeats = _repeats(image_ids, tokens, labels, tags, video_ids)
        copies = [i for i, _ in repeats]
        if copies:  # the same on every rank: the gathered lists are
            img, txt, labels, tags, tokens, image_ids = _without(
                copies, img, txt, labels, tags, tokens, image_ids
            )

        metrics: dict[str, float] = {"eval/num_samples": float(img.shape[0])}
        if copies:
            metrics["eval/duplicate_samples"] = float(len(copies))
            _warn_copies(len(copies), sum(reencoded for _, reencoded in repeats))
        if img.shape[0] == 0:
            return metrics
        pair_groups = retrieval_pair_groups(tokens, image_ids)  # identical images / captions: one each
        image_groups, caption_groups = (torch.tensor(g, device=img.device) for g in pair_groups)
        recalls = paired_recall_at_k(img, txt, image_groups=image_groups, caption_groups=caption_groups)
        for name, recall in zip(("i2t", "t2i"), recalls, strict=True):
            metrics.update({f"eval/{name}_r{k}": value for k, value in recall.items()})

        def encode_text(texts):
            chunks = []
            for start in range(0, len(texts), 256):
                tok = tokenize(texts[start : start + 256])
                _, t, _, _ = engine(
                    input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
                )
                chunks.append(t.to(torch.float32, copy=True))  # a copy: see run() above
            return torch.cat(chunks)

        if scored_classes_only:
            classes = _classes_of_samples(classes, labels)
        if classes:
            classes, class_index = merge_same_prompts(classes, templates, tokenize)
            emb = class_embeddings(encode_text, classes, templates)
            # A sample's labels: one for a scalar field, each element of a list field (a hit when
            # the top class is any of them); a sample without one of the classes is left out.
            # (the class index built once: per sample it cost N x C, minutes at 50k tags and samples)
            # Copies of one image share their labels: a thumbnail of a Gaming and a Music video
            # could match only one of them, so a perfect model scored 0.5 on the pair.
            label_columns = [
                sorted({class_index[lab] for lab in labs if lab in class_index})
                for labs in union_over_copies(labels, pair_groups[0])
            ]
            known = [i for i, cols in enumerate(label_columns) if cols]
            chance = 1.0 / len(classes)
            if known:
                hits = zero_shot_hits(img, emb, known, [label_columns[i] for i in known])
                metrics["eval/zeroshot_top1"] = hits / len(known)
                # A random guess hits a sample with m of the C classes with probability m / C.
                labelled = sum(len(label_columns[i]) for i in known)
                chance = labelled / (len(known) * len(classes))
            metrics["eval/zeroshot_samples"] = float(len(known))
            metrics["eval/zeroshot_chance"] = chance
            metrics["eval/zeroshot_classes"] = float(len(classes))
        if any(tags):  # every rank holds the same gathered tags, so the text forwards stay in lockstep
            metrics.update(
                tag_metrics(img, tags, encode_text, templates, tokenize, tag_vocab_size, pair_groups[0])
            )
        return metrics
    finally:  # also after an early return or an error: training goes on in train mode
        if was_training:
            engine.train()


def _classes_of_samples(classes: list[str], labels: list[set]) -> list[str]:
    """The classes that some sample's labels hold, in the order of ``classes``.

    A class whose every sample was skipped as unreadable (its images do not decode) was still a
    candidate: it counted in eval/zeroshot_classes and lowered eval/zeroshot_chance, though no
    evaluated sample has it."""
    carried = set().union(*labels) if labels else set()
    return [c for c in classes if c in carried]


class Evaluator:
    """The periodic eval of one run: validation batches, zero-shot classes and templates from the config.

    The class list is read from the validation shards once, and again when the shards change
    (names or sizes): a shard written or replaced during the run brought samples of classes the
    list lacked, and zero-shot left them out without a word.

    local_world_size: ranks on this node, which share its cores between their loader workers under
    ``data.num_workers=-1`` (auto); None counts the ranks on this host at the first eval.
    """

    def __init__(
        self,
        cfg: RunConfig,
        rank: int,
        world_size: int,
        preprocess,
        tokenize,
        processor,
        input_dtype: torch.dtype,
        device: torch.device,
        local_world_size: int | None = None,
    ):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.local_world_size = local_world_size
        self.preprocess, self.tokenize = preprocess, tokenize
        self.input_dtype, self.device = input_dtype, device
        from vutrain.data.preprocess import crop_size

        # The dummy batch of a rank whose batches ran out goes through the vision tower: it must
        # have the processor's crop size (transformers 5 gives a SizeDict here, not a dict).
        self.image_hw = crop_size(processor)
        self._classes: list[str] | None = None
        self._classes_of: tuple | None = None  # the shards' view (names, sizes) the classes were read from
        self._logged_workers = False

    def classes(self, shards_view: tuple | None = None) -> list[str]:
        """The distinct values of eval.zeroshot_field in the validation shards, read by rank 0 and
        sent to the others (every rank calls this at the same eval); read again when
        ``shards_view`` (``agree_on_val_shards``'s, the same on every rank) differs from the last."""
        if self._classes is None or shards_view != self._classes_of:
            self._classes_of = shards_view
            from vutrain.data.val import collect_label_values

            cfg = self.cfg
            self._classes = read_on_first_rank(
                lambda: collect_label_values(cfg.data.val_shards, cfg.eval.zeroshot_field), self.device
            )
        return self._classes

    def val_stream(self):
        """This rank's ``ValStream`` of the validation shards (every rank calls this at the same eval
        when ``local_world_size`` is to be counted: a collective)."""
        from vutrain.data.val import ValStream

        cfg = self.cfg
        if cfg.data.num_workers == -1 and self.local_world_size is None:
            self.local_world_size = ranks_on_this_host()
        stream = ValStream(
            cfg.data.val_shards,
            preprocess=self.preprocess,
            tokenize=self.tokenize,
            batch_size=cfg.eval.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            caption_template=cfg.data.caption_template,
            label_field=cfg.eval.zeroshot_field,
            num_workers=cfg.data.num_workers,  # >= 2 (or auto): the images are decoded in loader workers
            local_world_size=self.local_world_size or 1,
        )
        if cfg.data.num_workers == -1 and not self._logged_workers and self.rank == 0:
            self._logged_workers = True
            log.info(
                "data.num_workers=-1: eval reads with %d loader workers per rank (0: in this process)",
                stream.loader_workers(),
            )
        return stream

    def __call__(self, engine, stop_requested=None) -> dict[str, float]:
        """Evaluate `engine` on the validation shards (every rank calls this at the same step).

        Adds `eval/skipped_samples`: validation samples skipped as unreadable, summed over ranks."""
        cfg = self.cfg
        # Before any other collective of the eval: a rank that cannot read the set stops every rank.
        shards_view = agree_on_val_shards(cfg.data.val_shards, self.device)
        batches = self.val_stream()
        dummy = dict(
            self.tokenize([""]), pixel_values=torch.zeros(1, 3, *self.image_hw), labels=[""], label_sets=[[]]
        )
        # A val shard on a hung mount (or a stuck loader worker) left the run silent mid-eval forever:
        # its batch pulls are watched as training's are, by a watcher that ends with this eval.
        from vutrain.data_wait import DataWaitWatch, describe_val_loader

        watch = DataWaitWatch(cfg.data.stall_warning_s, self.rank, lambda: describe_val_loader(batches))
        try:
            metrics = evaluate(
                engine,
                watch.watched(batches, what=f"the eval of data.val_shards={cfg.data.val_shards}"),
                self.classes(shards_view),
                list(cfg.eval.templates),
                self.tokenize,
                self.input_dtype,
                self.device,
                dummy,
                tag_vocab_size=cfg.eval.tag_vocab_size,
                stop_requested=stop_requested,
                scored_classes_only=True,
            )
        finally:
            watch.close()  # joins the watcher thread (never raises)
        # Undecodable validation samples were only logged (three per reason and rank), so a
        # held-out set that lost a share of its images reported metrics over the rest unnoticed.
        from vutrain.data.samples import lost_and_ignored

        # Lost samples only: a member dropped beside a sample that is evaluated is not a lost sample.
        lost, _ = lost_and_ignored(batches.skipped())
        skipped = torch.tensor([lost], dtype=torch.long, device=self.device)
        all_reduce(skipped)
        metrics["eval/skipped_samples"] = float(skipped.item())
        if metrics["eval/num_samples"] == 0 and self.rank == 0:
            # The row of an eval without a sample holds counts only: without this line a held-out
            # set that no longer reads looked like an eval whose metrics went missing.
            log.warning(
                "eval: no validation sample of data.val_shards=%s could be read (%d skipped as unreadable); "
                "this eval has no recall or zero-shot metric. Check the shards with "
                "`python -m dataset_tools inspect DIR --verify`.",
                cfg.data.val_shards,
                int(metrics["eval/skipped_samples"]),
            )
        return metrics
