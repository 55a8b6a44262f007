"""``linewatch alarms``: turns a line's verdicts and defects into alarms for the operator.

The rules are pure logic, fed records and explicit times, so they are tested
without Redis or a clock (:class:`AlarmRules`). Times are the records' own
``ts_decided_ns``; only the silence check takes "now" from its caller.

Alarm kinds (``AlarmRecord.kind``), each per camera:

- ``reject_rate`` (warning): the share of rejected parts over the last
  ``reject_rate_window_s`` is above ``reject_rate_limit`` (judged from
  ``reject_rate_min_parts`` parts on). Fail-safe rejects count: the gate rejects them.
- ``repeated_defect`` (warning): ``repeat_count`` parts within ``repeat_window_s``
  have a defect whose centre lies within ``repeat_radius_px`` of the newest one: a
  fixture, tool or lens fault rather than a bad part.
- ``camera_silent`` (critical) when a camera has had no verdict for ``silence_s``,
  ``camera_resumed`` (info) at its next verdict. The decision service gives a verdict
  even for frames it could not score (fail-safe), so silence means acquisition or
  the decision service is down; workers that stopped show up as fail-safe rejects.
- ``fail_safe_reject`` (critical): a part was rejected because it could not be
  scored in time; the first at once, then at most one per ``fail_safe_cooldown_s``
  counting what happened in between, by reason.
- ``score_drift`` (warning): the scores of passing parts moved: the two-sample
  Kolmogorov-Smirnov statistic between the first ``drift_reference_parts`` passing
  scores (of the current model and threshold) and the last ``drift_recent_parts``
  reaches ``drift_ks_limit`` with a p-value below ``drift_p_limit``. Passing parts only,
  because rejects are by definition outside the learnt distribution.

Except for silence, which alarms once per silence, an alarm of a kind repeats for a
camera at most once per ``cooldown_s``.

Camera state changes that acquisition reports (``CameraStatus``) reach the decision
service only, so the decision service writes their alarms to the same stream itself:
``camera_lost`` (critical) and ``camera_reconnected`` (info), ``overexposed`` and
``underexposed`` (warnings) and ``exposure_ok`` (info;
:mod:`linewatch.acquisition.exposure`), once per camera and status time (see
:mod:`linewatch.decision.service`). ``camera_silent`` stays, for what no status reports:
an acquisition process that died, a decision service that is down.

The consumer reads through the group ``alarms.group``, created at the end of the
streams (``$``): a new group judges the line from now on, not its history. Rule
state lives in memory, so run one alarms consumer per line. An alarm and the
acknowledgement of the entry that raised it are written in one transaction, and an
entry seen before (re-delivered after an outage) is only acknowledged, so an alarm
is neither lost nor repeated.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis
from pydantic import ValidationError
from scipy.stats import ks_2samp

from linewatch.config import AlarmsConfig, LineConfig
from linewatch.consumers.group import (
    GroupConsumer,
    GroupReader,
    StreamEntry,
    block_ms_for,
    consumer_name,
)
from linewatch.lifecycle import run_until_signalled
from linewatch.log import get_logger
from linewatch.streams.client import redis_client
from linewatch.streams.records import AlarmRecord, DefectRecord, StreamKeys, VerdictRecord

log = get_logger("alarms")

NS = 1_000_000_000
Severity = Literal["info", "warning", "critical"]

# Rule state is per process, so a second alarms consumer only takes over entries a
# crashed one left behind, after a minute.
_CLAIM_IDLE_MS = 60_000
_CLAIM_INTERVAL_S = 30.0


def _alarm(
    kind: str, severity: Severity, camera: str | None, ts_ns: int, message: str,
    **details: Any,
) -> AlarmRecord:
    return AlarmRecord(
        kind=kind, severity=severity, message=message, camera=camera, ts_ns=ts_ns,
        details_json=json.dumps(details, sort_keys=True),
    )


class Cooldown:
    """Lets an alarm for a key through at most once per ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.period_ns = int(seconds * NS)
        self._last: dict[tuple[str, str], int] = {}

    def ready(self, key: tuple[str, str], now_ns: int) -> bool:
        """True when ``key`` has not alarmed within the period before ``now_ns``."""
        last = self._last.get(key)
        return last is None or now_ns - last >= self.period_ns

    def mark(self, key: tuple[str, str], now_ns: int) -> None:
        """Record that ``key`` alarmed at ``now_ns``."""
        self._last[key] = now_ns


# --------------------------------------------------------------------------- rules


class RejectRate:
    """Share of rejected parts per camera over a sliding time window."""

    def __init__(self, cfg: AlarmsConfig) -> None:
        self.cfg = cfg
        self.window_ns = int(cfg.reject_rate_window_s * NS)
        self._parts: dict[str, deque[tuple[int, bool]]] = {}
        self._rejects: dict[str, int] = {}

    def observe(self, verdict: VerdictRecord) -> AlarmRecord | None:
        """Add a verdict; an alarm when the rate is over the limit (cooldown not applied)."""
        camera, now = verdict.camera, verdict.ts_decided_ns
        parts = self._parts.setdefault(camera, deque())
        rejected = verdict.verdict == "reject"
        parts.append((now, rejected))
        rejects = self._rejects.get(camera, 0) + rejected
        while parts and parts[0][0] <= now - self.window_ns:
            rejects -= parts.popleft()[1]
        self._rejects[camera] = rejects
        rate = rejects / len(parts)
        if len(parts) < self.cfg.reject_rate_min_parts or rate <= self.cfg.reject_rate_limit:
            return None
        return _alarm(
            "reject_rate", "warning", camera, now,
            f"{camera}: {rate:.0%} of {len(parts)} parts rejected in the last "
            f"{self.cfg.reject_rate_window_s:g} s (limit {self.cfg.reject_rate_limit:.0%})",
            rate=round(rate, 4), parts=len(parts), rejects=rejects,
            window_s=self.cfg.reject_rate_window_s, limit=self.cfg.reject_rate_limit,
        )


class RepeatedDefect:
    """Defects at the same place of the image in several parts within a time window."""

    def __init__(self, cfg: AlarmsConfig) -> None:
        self.cfg = cfg
        self.window_ns = int(cfg.repeat_window_s * NS)
        self._recent: dict[str, deque[tuple[int, float, float, str]]] = {}

    def observe(self, defect: DefectRecord) -> AlarmRecord | None:
        """Add a defect region; an alarm when enough parts had one near its centre."""
        camera, now = defect.camera, defect.ts_decided_ns
        cx, cy = defect.x + defect.w / 2.0, defect.y + defect.h / 2.0
        recent = self._recent.setdefault(camera, deque())
        while recent and recent[0][0] <= now - self.window_ns:
            recent.popleft()
        recent.append((now, cx, cy, defect.frame_id))
        radius = self.cfg.repeat_radius_px
        frames = {f for _, x, y, f in recent if math.hypot(x - cx, y - cy) <= radius}
        if len(frames) < self.cfg.repeat_count:
            return None
        return _alarm(
            "repeated_defect", "warning", camera, now,
            f"{camera}: defect at ({cx:.0f}, {cy:.0f}) in {len(frames)} parts within "
            f"{self.cfg.repeat_window_s:g} s: check fixture, tooling and lens there",
            x=round(cx, 1), y=round(cy, 1), parts=len(frames), radius_px=radius,
            frame_ids=sorted(frames),
        )


class Silence:
    """Cameras without verdicts for ``silence_s``; each silence alarms once."""

    def __init__(self, cfg: AlarmsConfig, cameras: Sequence[str], start_ns: int) -> None:
        self.period_ns = int(cfg.silence_s * NS)
        self._last: dict[str, int] = dict.fromkeys(cameras, start_ns)
        self._silent: set[str] = set()

    def seen(self, camera: str, ts_ns: int) -> AlarmRecord | None:
        """Note a verdict of ``camera``; ``camera_resumed`` if it was silent."""
        self._last[camera] = max(ts_ns, self._last.get(camera, ts_ns))
        if camera not in self._silent:
            return None
        self._silent.discard(camera)
        return _alarm("camera_resumed", "info", camera, ts_ns,
                      f"{camera}: verdicts again", camera_state="resumed")

    def check(self, now_ns: int) -> list[AlarmRecord]:
        """``camera_silent`` for each camera that fell silent by ``now_ns``."""
        alarms = []
        for camera, last in sorted(self._last.items()):
            quiet_ns = now_ns - last
            if camera in self._silent or quiet_ns < self.period_ns:
                continue
            self._silent.add(camera)
            alarms.append(_alarm(
                "camera_silent", "critical", camera, now_ns,
                f"{camera}: no verdict for {quiet_ns / NS:.0f} s: camera, acquisition or "
                "decision service down?",
                silent_s=round(quiet_ns / NS, 1), last_verdict_ns=last,
            ))
        return alarms


@dataclass
class _FailSafeCount:
    first_ns: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class FailSafe:
    """Fail-safe rejects: the first at once, then a count per cooldown period."""

    def __init__(self, cfg: AlarmsConfig) -> None:
        self.cooldown = Cooldown(cfg.fail_safe_cooldown_s)
        self._held: dict[str, _FailSafeCount] = {}

    def observe(self, verdict: VerdictRecord) -> AlarmRecord | None:
        """Count a fail-safe verdict; an alarm when the camera's cooldown allows one."""
        if not verdict.fail_safe:
            return None
        held = self._held.setdefault(verdict.camera, _FailSafeCount(verdict.ts_decided_ns))
        held.reasons[verdict.reason] = held.reasons.get(verdict.reason, 0) + 1
        return self._release(verdict.camera, verdict.ts_decided_ns)

    def check(self, now_ns: int) -> list[AlarmRecord]:
        """Alarms for counts held back whose cooldown has passed by ``now_ns``."""
        alarms = [self._release(camera, now_ns) for camera in sorted(self._held)]
        return [a for a in alarms if a is not None]

    def _release(self, camera: str, now_ns: int) -> AlarmRecord | None:
        key = ("fail_safe_reject", camera)
        if not self.cooldown.ready(key, now_ns):
            return None
        held = self._held.pop(camera)
        self.cooldown.mark(key, now_ns)
        total = sum(held.reasons.values())
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(held.reasons.items()))
        return _alarm(
            "fail_safe_reject", "critical", camera, now_ns,
            f"{camera}: {total} part(s) rejected unscored ({reasons})",
            count=total, reasons=held.reasons, since_ns=held.first_ns,
        )


@dataclass
class _Scores:
    model: tuple[str | None, str | None]
    reference: list[float] = field(default_factory=list)
    recent: deque[float] = field(default_factory=deque)
    since_check: int = 0


class Drift:
    """Drift of passing parts' scores: KS statistic of recent vs reference scores."""

    def __init__(self, cfg: AlarmsConfig) -> None:
        self.cfg = cfg
        self._cameras: dict[str, _Scores] = {}

    def observe(self, verdict: VerdictRecord) -> AlarmRecord | None:
        """Add a passing part's score; an alarm when its distribution has moved."""
        if verdict.verdict != "pass" or verdict.fail_safe or verdict.score is None:
            return None
        scores = self._scores(verdict)
        if len(scores.reference) < self.cfg.drift_reference_parts:
            scores.reference.append(verdict.score)
            return None
        scores.recent.append(verdict.score)
        scores.since_check += 1
        if (len(scores.recent) < self.cfg.drift_recent_parts
                or scores.since_check < self.cfg.drift_check_every):
            return None
        scores.since_check = 0
        return self._compare(verdict, scores)

    def _scores(self, verdict: VerdictRecord) -> _Scores:
        # A new model or threshold scores on another scale: start a new reference.
        model = (verdict.model_id, verdict.threshold_version)
        scores = self._cameras.get(verdict.camera)
        if scores is None or scores.model != model:
            if scores is not None:
                log.info("drift_reference_reset", camera=verdict.camera, model_id=model[0],
                         threshold_version=model[1])
            scores = _Scores(model, recent=deque(maxlen=self.cfg.drift_recent_parts))
            self._cameras[verdict.camera] = scores
        return scores

    def _compare(self, verdict: VerdictRecord, scores: _Scores) -> AlarmRecord | None:
        result = ks_2samp(scores.reference, list(scores.recent))
        ks, p = float(result.statistic), float(result.pvalue)
        if ks < self.cfg.drift_ks_limit or p >= self.cfg.drift_p_limit:
            return None
        ref_mean, recent_mean = statistics.fmean(scores.reference), statistics.fmean(scores.recent)
        ref_sd = statistics.pstdev(scores.reference)
        shift = (recent_mean - ref_mean) / ref_sd if ref_sd > 0 else None
        shift_text = f", mean moved {shift:+.1f} sd" if shift is not None else ""
        return _alarm(
            "score_drift", "warning", verdict.camera, verdict.ts_decided_ns,
            f"{verdict.camera}: scores of passing parts drifted (KS {ks:.2f}{shift_text}): "
            "lighting, optics or product changed?",
            ks=round(ks, 4), p_value=p, mean_shift_sd=None if shift is None else round(shift, 3),
            reference_mean=ref_mean, recent_mean=recent_mean,
            reference_parts=len(scores.reference), recent_parts=len(scores.recent),
            model_id=verdict.model_id,
        )


class AlarmRules:
    """Every alarm rule of a line, with cooldowns; pure: no Redis, no clock.

    ``cameras`` are watched for silence from ``start_ns`` on; cameras not listed
    are watched from their first verdict.

    >>> from linewatch.config import AlarmsConfig
    >>> rules = AlarmRules(AlarmsConfig(silence_s=10), ["cam0"], start_ns=0)
    >>> [a.kind for a in rules.tick(11 * NS)]
    ['camera_silent']
    """

    def __init__(self, cfg: AlarmsConfig, cameras: Sequence[str] = (), *, start_ns: int) -> None:
        self.cfg = cfg
        self.cooldown = Cooldown(cfg.cooldown_s)
        self.reject_rate = RejectRate(cfg)
        self.repeated_defect = RepeatedDefect(cfg)
        self.silence = Silence(cfg, cameras, start_ns)
        self.fail_safe = FailSafe(cfg)
        self.drift = Drift(cfg)

    def update(self, verdict: VerdictRecord) -> list[AlarmRecord]:
        """Alarms raised by one verdict."""
        alarms = [
            self.silence.seen(verdict.camera, verdict.ts_decided_ns),
            self.fail_safe.observe(verdict),
            self._cooled(self.reject_rate.observe(verdict)),
            self._cooled(self.drift.observe(verdict)),
        ]
        return [a for a in alarms if a is not None]

    def update_defect(self, defect: DefectRecord) -> list[AlarmRecord]:
        """Alarms raised by one defect region."""
        alarm = self._cooled(self.repeated_defect.observe(defect))
        return [alarm] if alarm is not None else []

    def tick(self, now_ns: int) -> list[AlarmRecord]:
        """Alarms due by the clock at ``now_ns``: silent cameras, held fail-safe counts."""
        return self.silence.check(now_ns) + self.fail_safe.check(now_ns)

    def _cooled(self, alarm: AlarmRecord | None) -> AlarmRecord | None:
        if alarm is None:
            return None
        key = (alarm.kind, alarm.camera or "")
        if not self.cooldown.ready(key, alarm.ts_ns):
            return None
        self.cooldown.mark(key, alarm.ts_ns)
        return alarm


# --------------------------------------------------------------------------- consumer


@dataclass
class AlarmsStats:
    """What an alarms consumer did since it started."""

    verdicts: int = 0
    defects: int = 0
    alarms: int = 0
    malformed: int = 0
    redelivered: int = 0


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class AlarmsConsumer(GroupConsumer):
    """Feeds a line's verdicts and defects to :class:`AlarmRules` and writes their alarms.

    ``clock_ns`` (wall clock, ns since epoch) drives the silence check, which runs only
    once the consumer has caught up with the streams.
    """

    def __init__(
        self,
        client: redis.Redis,
        line: str,
        cfg: AlarmsConfig,
        cameras: Sequence[str] = (),
        *,
        alarms_maxlen: int = 100_000,
        block_ms: int = 500,
        retry_interval_s: float = 1.0,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.keys = StreamKeys(line)
        reader = GroupReader(
            client, [self.keys.verdicts, self.keys.defects], cfg.group,
            consumer_name(cfg.consumer), start_id="$", block_ms=block_ms,
            claim_idle_ms=_CLAIM_IDLE_MS,
        )
        super().__init__(reader, claim_interval_s=_CLAIM_INTERVAL_S,
                         retry_interval_s=retry_interval_s)
        self.client = client
        self.alarms_maxlen = alarms_maxlen
        self.rules = AlarmRules(cfg, cameras, start_ns=clock_ns())
        self.stats = AlarmsStats()
        self._clock_ns = clock_ns
        self._done: dict[str, tuple[int, int]] = {}  # last entry handled, per stream
        self._outbox: list[AlarmRecord] = []
        self._to_ack: list[StreamEntry] = []

    def poll(self) -> int:
        """Write what an outage held back, handle a round of entries, then the clock's checks."""
        self._flush()
        handled = super().poll()
        if handled < self.reader.count:  # caught up: "now" is comparable with the records
            self._outbox += self.rules.tick(self._clock_ns())
            self._flush()
        return handled

    def handle(self, entry: StreamEntry) -> None:
        """Run the rules on one verdict or defect; write its alarms and ack it at once."""
        order = _entry_order(entry.id)
        if order <= self._done.get(entry.stream, (-1, -1)):
            self.stats.redelivered += 1  # its alarms were raised already
        else:
            self._outbox += self._apply(entry)
            self._done[entry.stream] = order
        self._to_ack.append(entry)
        self._flush()

    def _apply(self, entry: StreamEntry) -> list[AlarmRecord]:
        try:
            if entry.stream == self.keys.verdicts:
                alarms = self.rules.update(VerdictRecord.from_fields(entry.fields))
                self.stats.verdicts += 1
            else:
                alarms = self.rules.update_defect(DefectRecord.from_fields(entry.fields))
                self.stats.defects += 1
        except ValidationError as exc:
            log.error("record_malformed", stream=entry.stream, entry=entry.id,
                      error=str(exc).splitlines()[0])
            self.stats.malformed += 1
            return []
        return alarms

    def _flush(self) -> None:
        """Write held alarms and acks in one transaction; kept for the next try on error."""
        if not self._outbox and not self._to_ack:
            return
        with self.client.pipeline(transaction=True) as pipe:
            for alarm in self._outbox:
                pipe.xadd(self.keys.alarms, alarm.to_fields(),  # type: ignore[arg-type]
                          maxlen=self.alarms_maxlen, approximate=True)
            for entry in self._to_ack:
                pipe.xack(entry.stream, self.reader.group, entry.id)
            pipe.execute()
        for alarm in self._outbox:
            log.warning("alarm", kind=alarm.kind, severity=alarm.severity, camera=alarm.camera,
                        message=alarm.message)
        self.stats.alarms += len(self._outbox)
        self._outbox, self._to_ack = [], []


def run_alarms(config: LineConfig, redis_url: str | None = None) -> AlarmsStats:
    """Run the alarms consumer of ``config``'s line until SIGINT/SIGTERM."""
    client = redis_client(config.redis, redis_url)
    consumer = AlarmsConsumer(
        client, config.line, config.alarms, [c.id for c in config.cameras],
        alarms_maxlen=config.redis.alarms_maxlen, block_ms=block_ms_for(config.redis),
        retry_interval_s=config.redis.retry_interval_s,
    )
    try:
        run_until_signalled(consumer)
    finally:
        client.close()
    return consumer.stats
