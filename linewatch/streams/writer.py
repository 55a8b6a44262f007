"""Writes a line's verdicts, defects, rejects and heatmaps, and the decision service's
alarms, to Redis streams.

One frame's records are written by one Lua script, so they appear together or not
at all, and only once: the script sets ``linewatch:<line>:done:<frame_id>`` (with a
TTL) and refuses a frame whose key exists. A re-delivered result, a restarted
decision service or a spool drained twice therefore never duplicates a verdict.

Alarms written here are those only the decision service can raise (camera status
that acquisition reports to it); they are idempotent the same way, by
``linewatch:<line>:alarm_done:<kind>:<camera>:<ts_ns>``. The alarms consumer writes
its own rules' alarms itself, together with its acknowledgements.

When Redis cannot be reached the records go to the on-disk :class:`Spool` and are
drained, in order, once Redis answers again; ``write_verdict`` never raises for an
unreachable Redis. After a failure the writer does not try Redis itself until a
:class:`~linewatch.streams.probe.RedisProbe` has had a PING answered, so a Redis that does
not answer at all costs the caller one timeout, not one per retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from linewatch.config import DecisionConfig, RedisConfig
from linewatch.log import get_logger
from linewatch.streams.probe import RedisProbe
from linewatch.streams.records import (
    AlarmRecord,
    DefectRecord,
    RejectRecord,
    StreamKeys,
    VerdictBatch,
    VerdictRecord,
)
from linewatch.streams.spool import Spool, SpoolItem
from linewatch.wire import FrameHeader

log = get_logger("stream_writer")

# KEYS: done, verdicts, defects, rejects, pending, heatmap keys...
# ARGV: dedupe ttl, verdicts/defects/rejects maxlen, heatmap ttl, frame id, then the
#       verdict, the defect count and each defect, the reject count (0/1) and the reject,
#       each record as <n fields> k1 v1 ... kn vn; then one PNG per heatmap key.
# The done key is set last, holding the verdict's entry id. Redis runs the script
# atomically, so no other client sees a frame half written. Every entry gets
# ts_written_us from the server's clock: the entry id's ms part is too coarse to time a
# line whose whole overhead is a few ms. (TIME before writes needs effects replication,
# the default since Redis 5.)
_WRITE_FRAME_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HDEL', KEYS[5], ARGV[6])
  return false
end
local now = redis.call('TIME')
local written_us = now[1] .. string.format('%06d', tonumber(now[2]))
local i = 7
local function take()
  local n = tonumber(ARGV[i])
  local fields = {}
  for j = 1, 2 * n do fields[j] = ARGV[i + j] end
  i = i + 2 * n + 1
  fields[2 * n + 1] = 'ts_written_us'
  fields[2 * n + 2] = written_us
  return fields
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(take()))
local n_defects = tonumber(ARGV[i])
i = i + 1
for _ = 1, n_defects do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(take()))
end
local n_rejects = tonumber(ARGV[i])
i = i + 1
if n_rejects == 1 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', unpack(take()))
end
for k = 6, #KEYS do
  redis.call('SET', KEYS[k], ARGV[i], 'EX', ARGV[5])
  i = i + 1
end
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[6])
return id
"""

# KEYS: the frame's done key, the pending hash. ARGV: frame id, header JSON.
# A frame written before (announced again to a restarted decision service) is not noted.
_NOTE_PENDING_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: the alarm's done key, the alarms stream. ARGV: dedupe ttl, alarms maxlen, then
# the alarm's fields k1 v1 ... kn vn.
_WRITE_ALARM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
return id
"""


@dataclass
class WriterCounters:
    """Totals since the writer was made."""

    written: int = 0
    duplicates: int = 0
    spooled: int = 0
    refused: int = 0
    drained: int = 0
    alarms: int = 0
    redis_errors: int = 0


def _flat(fields: dict[str, str]) -> list[str]:
    return [str(len(fields)), *(x for kv in fields.items() for x in kv)]


class StreamWriter:
    """Writes to the streams of line ``line``; spools to ``spool`` while Redis is away.

    ``decision`` chooses where heatmaps go (``decision.heatmaps``); ``spool`` defaults
    to ``<redis.spool_dir>/<line>``. Not thread-safe: one writer per thread. :meth:`close`
    stops its probe.
    """

    def __init__(
        self,
        client: redis.Redis,
        line: str,
        cfg: RedisConfig,
        decision: DecisionConfig | None = None,
        spool: Spool | None = None,
    ) -> None:
        self.client = client
        self.keys = StreamKeys(line)
        self.cfg = cfg
        self.decision = decision or DecisionConfig()
        self.spool = spool or Spool(cfg.spool_dir / line, cfg.spool_max_bytes)
        self.counters = WriterCounters()
        self.probe = RedisProbe(client, cfg.retry_interval_s)
        self._script = client.register_script(_WRITE_FRAME_LUA)
        self._alarm_script = client.register_script(_WRITE_ALARM_LUA)
        self._pending_script = client.register_script(_NOTE_PENDING_LUA)

    def close(self) -> None:
        """Stop the probe (the client is the caller's to close)."""
        self.probe.close()

    # ------------------------------------------------------------------ verdicts

    def write_verdict(
        self,
        verdict: VerdictRecord,
        defects: Sequence[DefectRecord] = (),
        reject: RejectRecord | None = None,
        heatmaps: Sequence[bytes] = (),
    ) -> bool:
        """Write one frame's records at once; ``heatmaps[i]`` (PNG) belongs to ``defects[i]``.

        Sets each defect's ``heatmap_ref`` per ``decision.heatmaps``. True when the
        records were written now or spooled; False when the frame was already written
        (a duplicate) or a full spool refused it (logged as an error and counted).
        """
        return self.write_verdicts([VerdictBatch(verdict, tuple(defects), reject,
                                                 tuple(heatmaps))])[0]

    def write_verdicts(self, batches: Sequence[VerdictBatch]) -> list[bool]:
        """Write several frames' records, in order, in one round trip to Redis.

        Each frame is still its own atomic, idempotent script call (see
        :meth:`write_verdict`, whose True/False this returns per frame). If Redis fails
        part-way, every frame of the call is spooled: those already written are refused
        as duplicates when the spool drains, so none is lost and none is doubled.
        """
        for batch in batches:
            if batch.heatmaps and len(batch.heatmaps) != len(batch.defects):
                raise ValueError(f"{len(batch.heatmaps)} heatmaps for {len(batch.defects)} "
                                 f"defects of {batch.frame_id}")
        items = [self._with_heatmaps(batch) for batch in batches]
        if not items:
            return []
        if not self._redis_ready():
            return [self._to_spool(item) for item in items]
        try:
            entry_ids = self._run_frame_scripts(items)
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return [self._to_spool(item) for item in items]
        return [self._counted(item, entry_id) for item, entry_id in zip(items, entry_ids,
                                                                         strict=True)]

    def _run_frame_scripts(self, items: Sequence[VerdictBatch]) -> list[Any]:
        """The frame script for each item, pipelined; the entry ids (None: a duplicate)."""
        for attempt in (1, 2):
            # EVALSHA straight into the pipeline: redis-py's Script would first ask
            # SCRIPT EXISTS, a second round trip on every call.
            with self.client.pipeline(transaction=False) as pipe:
                for item in items:
                    keys = self._script_keys(item)
                    pipe.evalsha(self._script.sha, len(keys), *keys, *self._script_args(item))
                try:
                    return cast(list[Any], pipe.execute())
                except redis.exceptions.NoScriptError:
                    if attempt == 2:
                        raise
                    # A restarted Redis has lost its scripts: load it and run the calls
                    # again (one that did run is refused as a duplicate the second time).
                    self.client.script_load(_WRITE_FRAME_LUA)
        raise AssertionError("unreachable")  # pragma: no cover

    def _counted(self, item: VerdictBatch, entry_id: Any) -> bool:
        if entry_id is None:
            self.counters.duplicates += 1
            log.info("verdict_duplicate_ignored", frame_id=item.frame_id)
            return False
        self.counters.written += 1
        return True

    def _with_heatmaps(self, batch: VerdictBatch) -> VerdictBatch:
        mode = self.decision.heatmaps
        if mode == "off" or not batch.heatmaps:
            defects = tuple(d.model_copy(update={"heatmap_ref": None}) for d in batch.defects)
            return VerdictBatch(batch.verdict, defects, batch.reject)
        refs = [self._store_heatmap_file(d, png) if mode == "disk" else
                self.keys.heatmap(d.frame_id, d.region)
                for d, png in zip(batch.defects, batch.heatmaps, strict=True)]
        defects = tuple(
            d.model_copy(update={"heatmap_ref": ref})
            for d, ref in zip(batch.defects, refs, strict=True)
        )
        # Files are already on disk; only Redis-bound heatmaps travel with the batch.
        pngs = batch.heatmaps if mode == "redis" else ()
        return VerdictBatch(batch.verdict, defects, batch.reject, pngs)

    def _store_heatmap_file(self, defect: DefectRecord, png: bytes) -> str:
        folder = self.decision.heatmap_dir / self.keys.line / defect.camera
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{defect.seq}_{defect.region}.png"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(png)
        tmp.replace(path)  # readers never see half a file
        return str(path)

    # ------------------------------------------------------------------ alarms

    def write_alarm(self, alarm: AlarmRecord) -> bool:
        """Append an alarm once per kind, camera and ``ts_ns``; spooled while Redis is away.

        True when written now or spooled; False when written before (a duplicate) or a
        full spool refused it (logged as an error and counted).
        """
        return self._write(alarm)

    def alarm_done_key(self, alarm: AlarmRecord) -> str:
        """Dedupe key of an alarm: ``linewatch:<line>:alarm_done:<kind>:<camera>:<ts_ns>``."""
        return f"{self.keys.prefix}alarm_done:{alarm.kind}:{alarm.camera or ''}:{alarm.ts_ns}"

    # ------------------------------------------------------------------ pending frames

    def remember_pending(self, header: FrameHeader) -> bool:
        """Note an announced frame in Redis so that a restarted service still decides it.

        False when the frame's verdict was written before (an announcement repeated to
        a restarted service), else True. Skipped (True) while Redis is away, so that an
        outage costs one failed attempt, not one per frame.
        """
        if self.redis_away:
            return True
        try:
            noted = self._pending_script(
                keys=[self.keys.done(header.frame_id), self.keys.pending],
                args=[header.frame_id, header.model_dump_json()],
            )
        except redis.RedisError as exc:
            # Best effort: while Redis is away the in-memory tracker still has the frame.
            self.counters.redis_errors += 1
            self.probe.redis_failed()
            log.debug("pending_not_saved", frame_id=header.frame_id, error=str(exc))
            return True
        return bool(noted)

    def load_pending(self) -> list[FrameHeader]:
        """Frames announced to an earlier run and not decided yet (empty if Redis is away)."""
        try:
            raw: dict[bytes, bytes] = self.client.hgetall(self.keys.pending)  # type: ignore[assignment]
        except redis.RedisError as exc:
            self.counters.redis_errors += 1
            log.warning("pending_not_loaded", error=str(exc))
            return []
        headers = []
        for frame_id, text in raw.items():
            try:
                headers.append(FrameHeader.model_validate_json(text))
            except ValueError as exc:
                log.error("pending_entry_invalid", frame_id=frame_id.decode(), error=str(exc))
        return sorted(headers, key=lambda h: h.deadline_ns)

    # ------------------------------------------------------------------ redis or spool

    @property
    def redis_away(self) -> bool:
        """True while records wait in the spool or Redis has not answered since a failure."""
        return bool(self.spool) or self.probe.away

    def _redis_ready(self) -> bool:
        """Whether to write to Redis now: it answers and the spool (if any) has drained."""
        return not self.probe.away and self.flush(force=False)

    def _write(self, item: SpoolItem) -> bool:
        if not self._redis_ready():
            return self._to_spool(item)
        try:
            written = self._write_redis(item)
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return self._to_spool(item)
        return written

    def flush(self, force: bool = True) -> bool:
        """Drain the spool into Redis; True when it is empty afterwards.

        Without ``force``, Redis is not tried while it is away (after a failure, until
        the probe's PING is answered), so a dead server does not slow every write down.
        """
        if not self.spool:
            return True
        if not force and self.probe.away:
            return False
        try:
            self.spool.drain(self)
        except redis.RedisError as exc:
            self._redis_failed(exc)
            return False
        self.probe.redis_answered()
        log.info("redis_back", drained_total=self.counters.drained)
        return True

    def write_spooled(self, item: SpoolItem) -> None:
        """Write one drained record to Redis; raises redis errors (the spool keeps its place)."""
        self._write_redis(item)
        self.counters.drained += 1

    def _redis_failed(self, exc: redis.RedisError) -> None:
        self.counters.redis_errors += 1
        self.probe.redis_failed()
        log.warning("redis_unavailable_spooling", error=str(exc), spool=str(self.spool.directory))

    def _to_spool(self, item: SpoolItem) -> bool:
        if self.spool.append([item]):
            self.counters.spooled += 1
            return True
        self.counters.refused += 1
        return False

    def _write_redis(self, item: SpoolItem) -> bool:
        if isinstance(item, AlarmRecord):
            return self._write_alarm_redis(item)
        (entry_id,) = self._run_frame_scripts([item])
        return self._counted(item, entry_id)

    def _write_alarm_redis(self, alarm: AlarmRecord) -> bool:
        keys = [self.alarm_done_key(alarm), self.keys.alarms]
        fields = [x for kv in alarm.to_fields().items() for x in kv]
        args: list[Any] = [self.cfg.dedupe_ttl_s, self.cfg.alarms_maxlen, *fields]
        if self._alarm_script(keys=keys, args=args) is None:
            self.counters.duplicates += 1
            log.info("alarm_duplicate_ignored", kind=alarm.kind, camera=alarm.camera,
                     ts_ns=alarm.ts_ns)
            return False
        self.counters.alarms += 1
        return True

    def _script_keys(self, batch: VerdictBatch) -> list[str]:
        k = self.keys
        with_png = batch.defects[: len(batch.heatmaps)]
        heatmap_keys = [k.heatmap(d.frame_id, d.region) for d in with_png]
        return [k.done(batch.frame_id), k.verdicts, k.defects, k.rejects, k.pending, *heatmap_keys]

    def _script_args(self, batch: VerdictBatch) -> list[Any]:
        cfg = self.cfg
        args: list[Any] = [
            cfg.dedupe_ttl_s,
            cfg.verdicts_maxlen,
            cfg.defects_maxlen,
            cfg.rejects_maxlen,
            self.decision.heatmap_ttl_s,
            batch.frame_id,
            *_flat(batch.verdict.to_fields()),
            len(batch.defects),
        ]
        for defect in batch.defects:
            args += _flat(defect.to_fields())
        args.append(1 if batch.reject is not None else 0)
        if batch.reject is not None:
            args += _flat(batch.reject.to_fields())
        args += batch.heatmaps
        return args

