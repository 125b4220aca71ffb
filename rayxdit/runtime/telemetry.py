"""GPU telemetry from NVML (``nvidia-ml-py``): what each rank's GPU is doing, as Ray metrics gauges.

Every rank of a served or batch worker group samples its own GPU every few seconds on a daemon thread
(``start_gpu_telemetry``), labelled by node, physical GPU index and pool. Where NVML is missing (a CPU
machine, a container without the driver library) or a field is unsupported (power on some boards, ECC on
consumer GPUs), that gauge is simply absent: telemetry never raises into the rank.

``sample_gpu`` is usable on its own (the serving benchmark records it next to its timings).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

GPU_METRICS = {
    "rayxdit_gpu_utilization_percent": "Percent of the last sample period in which a kernel ran (NVML).",
    "rayxdit_gpu_memory_used_bytes": "GPU memory in use, all processes (NVML).",
    "rayxdit_gpu_memory_total_bytes": "GPU memory in total (NVML).",
    "rayxdit_gpu_power_watts": "Board power draw (NVML).",
    "rayxdit_gpu_temperature_celsius": "GPU die temperature (NVML).",
    "rayxdit_gpu_sm_clock_mhz": "SM clock (NVML).",
    "rayxdit_gpu_throttled": "1 while clocks are held down by heat or a hardware slowdown (thermal, HW "
    "slowdown, power brake), else 0. Running at the power cap is not counted: a busy H200 sits there.",
    "rayxdit_gpu_clock_event_reasons": "NVML's clock event (throttle) reason bitmask, as is.",
    "rayxdit_gpu_ecc_uncorrected_errors": "Uncorrected ECC errors since the driver loaded (volatile counter).",
    "rayxdit_gpu_xid_errors": "Critical Xid events seen by this rank's sampler since it started.",
}
SAMPLE_PERIOD_S = 5.0
# Clock event reasons worth an alert: HW slowdown 0x8, SW thermal 0x20, HW thermal 0x40, HW power brake
# 0x80. Not the software power cap (0x4): a saturated H200 runs at its 700 W cap with it set all the time
# (measured: benchmarks/results/serve-flux-dev-1xh200.json), nor idling (0x1) or applications clocks (0x2).
_TROUBLE_REASONS = 0x8 | 0x20 | 0x40 | 0x80


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no GPU: no telemetry
        return None


def physical_gpu(device_index: int) -> str:
    """The GPU as NVML names it: the ``device_index``-th entry of ``CUDA_VISIBLE_DEVICES`` (Ray sets it per
    actor), else ``device_index`` itself."""
    visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    return visible[device_index] if device_index < len(visible) else str(device_index)


def _handle(nvml: Any, gpu: str) -> Any:
    if gpu.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(gpu))
    return nvml.nvmlDeviceGetHandleByUUID(gpu)


def _field(read: Callable[[], float]) -> float | None:
    try:
        return float(read())
    except Exception:  # NVMLError_NotSupported and friends: the gauge is absent
        return None


def sample_gpu(gpu: str = "0") -> dict[str, float]:
    """One NVML sample of ``gpu`` (index or UUID), by metric name; empty without NVML. Fields the GPU does
    not support are left out."""
    nvml = _nvml()
    if nvml is None:
        return {}
    try:
        handle = _handle(nvml, gpu)
    except Exception:
        return {}
    return _sample(nvml, handle)


def _sample(nvml: Any, handle: Any) -> dict[str, float]:
    reasons_read = (
        getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    )
    reasons = _field(lambda: reasons_read(handle))
    memory: tuple[float, float] | None
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        memory = (float(info.used), float(info.total))
    except Exception:
        memory = None
    values = {
        "rayxdit_gpu_utilization_percent": _field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        "rayxdit_gpu_memory_used_bytes": memory[0] if memory else None,
        "rayxdit_gpu_memory_total_bytes": memory[1] if memory else None,
        "rayxdit_gpu_power_watts": _field(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        "rayxdit_gpu_temperature_celsius": _field(
            lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        ),
        "rayxdit_gpu_sm_clock_mhz": _field(lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
        "rayxdit_gpu_clock_event_reasons": reasons,
        "rayxdit_gpu_throttled": None if reasons is None else float(int(reasons) & _TROUBLE_REASONS != 0),
        "rayxdit_gpu_ecc_uncorrected_errors": _field(lambda: _ecc_uncorrected(nvml, handle)),
    }
    return {name: value for name, value in values.items() if value is not None}


def _ecc_uncorrected(nvml: Any, handle: Any) -> float:
    return nvml.nvmlDeviceGetTotalEccErrors(
        handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
    )


def read_health(nvml: Any, handle: Any, ecc_at_start: float, xids: list[int]) -> dict[str, Any]:
    """What says whether a GPU can still be trusted (``rayxdit.serve.quarantine.fatal_gpu_faults`` decides):
    uncorrected ECC errors now and at ``ecc_at_start``, pages waiting to be retired, rows waiting to be
    remapped or a remapping failure (Ampere and later), the ``xids`` seen. Unsupported fields are left
    out."""
    report: dict[str, Any] = {"ecc_uncorrected_at_start": ecc_at_start, "xids": list(xids)}
    ecc = _field(lambda: _ecc_uncorrected(nvml, handle))
    if ecc is not None:
        report["ecc_uncorrected"] = ecc
    pending = _field(lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))
    if pending is not None:
        report["retired_pages_pending"] = bool(pending)
    try:
        _, _, rows_pending, remapping_failed = nvml.nvmlDeviceGetRemappedRows(handle)
        report["remapped_rows_pending"] = bool(rows_pending)
        report["remapping_failed"] = bool(remapping_failed)
    except Exception:  # NotSupported before Ampere
        pass
    return report


def gpu_health_now(gpu: str = "0") -> dict[str, Any]:
    """:func:`read_health` of ``gpu`` (index or UUID) read once, outside a rank (the GPU probe): ``{"gpu"}``
    alone without NVML."""
    nvml = _nvml()
    if nvml is None:
        return {"gpu": gpu}
    handle = _handle(nvml, gpu)
    ecc = _field(lambda: _ecc_uncorrected(nvml, handle)) or 0.0
    return {"gpu": gpu, **read_health(nvml, handle, ecc, [])}


class GpuTelemetry:
    """A daemon thread publishing one GPU's NVML samples as Ray gauges every ``period_s``."""

    def __init__(self, nvml: Any, gpu: str, pool: str, period_s: float = SAMPLE_PERIOD_S):
        from ray.util.metrics import Gauge

        self.nvml = nvml
        self.handle = _handle(nvml, gpu)
        self.tags = {"node": socket.gethostname(), "gpu": gpu, "pool": pool}
        self.gauges = {
            name: Gauge(name, description, tag_keys=tuple(self.tags))
            for name, description in GPU_METRICS.items()
        }
        self.period_s = period_s
        self.xid_errors = 0
        self.xids: list[int] = []
        """The Xid of each critical event seen (the newest 64): the quarantine reads the fatal ones."""
        self.ecc_at_start = _field(lambda: _ecc_uncorrected(nvml, self.handle)) or 0.0
        self.events = self._xid_events()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rayxdit-gpu-telemetry", daemon=True)
        self.thread.start()

    def _xid_events(self) -> Any | None:
        try:
            events = self.nvml.nvmlEventSetCreate()
            self.nvml.nvmlDeviceRegisterEvents(self.handle, self.nvml.nvmlEventTypeXidCriticalError, events)
            return events
        except Exception:  # unsupported (most containers): no Xid gauge
            return None

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                values = _sample(self.nvml, self.handle)
                if self.events is not None:
                    values["rayxdit_gpu_xid_errors"] = float(self._count_xids())
                for name, value in values.items():
                    self.gauges[name].set(value, tags=self.tags)
            except Exception as error:  # never into the rank: log and keep sampling
                logger.debug("GPU telemetry sample failed: %r", error)
            self.stopped.wait(self.period_s)

    def _count_xids(self) -> int:
        while True:
            try:
                event = self.nvml.nvmlEventSetWait_v2(self.events, 0)
            except Exception:  # timeout: no more events
                return self.xid_errors
            self.xid_errors += 1
            self.xids = [*self.xids[-63:], int(getattr(event, "eventData", 0))]

    def health(self) -> dict[str, Any]:
        """:func:`read_health` of this GPU, with the uncorrected ECC count when the rank started and the
        Xids this sampler has seen."""
        return read_health(self.nvml, self.handle, self.ecc_at_start, self.xids)

    def stop(self) -> None:
        self.stopped.set()


def start_gpu_telemetry(device_index: int, pool: str) -> GpuTelemetry | None:
    """Publish the GPU of this rank (``device_index`` among the visible ones) as gauges labelled ``pool``;
    None where NVML is not available, or with ``RAYXDIT_METRICS=0``."""
    if os.environ.get("RAYXDIT_METRICS", "1") == "0":
        return None
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        return GpuTelemetry(nvml, physical_gpu(device_index), pool)
    except Exception as error:
        logger.info("no GPU telemetry: %r", error)
        return None


def gpu_health(telemetry: GpuTelemetry | None, device_index: int) -> dict[str, Any]:
    """A rank's GPU (``gpu``: its physical index or UUID) and, with NVML, :meth:`GpuTelemetry.health`."""
    return {"gpu": physical_gpu(device_index), **(telemetry.health() if telemetry is not None else {})}
