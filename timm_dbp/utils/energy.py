""" Energy (kWh) and emissions (kg CO2eq) of a training run, measured with codecarbon's offline tracker

Optional: `pip install timm-dbp[energy]` brings codecarbon. Without it `EnergyMeter` still constructs, reports
`available=False` and None values, and the caller says once that energy was not measured (`NOT_MEASURED`).

codecarbon measures the whole machine (`tracking_mode='machine'`): CPU through RAPL where
/sys/class/powercap is readable, otherwise an estimate from the CPU's TDP and its load; NVIDIA GPUs through NVML;
RAM from an estimate (`EnergyMeter.method` says which). The CO2 figure is energy x the carbon intensity of the
given country's grid (codecarbon's own table: nothing is fetched). The meter never reaches the network, writes no
file and keeps codecarbon's logging to errors.
"""
import logging
import re
import tempfile
from typing import Any, Optional

__all__ = ['EnergyMeter', 'check_country_code', 'codecarbon_available', 'NOT_MEASURED']

NOT_MEASURED = 'energy not measured: pip install timm-dbp[energy]'

_logger = logging.getLogger(__name__)

# codecarbon's CPU modes, named by how they get the power
_CPU_METHODS = {
    'intel_rapl': 'RAPL', 'cpu_load': 'TDP x CPU load estimate', 'constant': 'TDP constant estimate',
    'intel_power_gadget': 'Intel Power Gadget', 'windows_emi': 'Windows EMI', 'apple_powermetrics': 'powermetrics',
}


def _import_codecarbon() -> Optional[Any]:
    """The codecarbon module with its logging kept to errors, or None when it is not installed."""
    try:
        import codecarbon
        from codecarbon.input import DataSource  # noqa: F401  (the offline country table)
    except ImportError:
        return None
    logging.getLogger('codecarbon').setLevel(logging.ERROR)  # its import set it to INFO
    return codecarbon


def codecarbon_available() -> bool:
    """Can energy be measured here (is codecarbon importable)?"""
    return _import_codecarbon() is not None


def check_country_code(code: str) -> str:
    """`code` if it is an ISO 3166-1 alpha-3 country code (3 uppercase letters, e.g. USA, FRA, DEU) that
    codecarbon's carbon-intensity table knows (the table is checked only when codecarbon is installed);
    otherwise ValueError with a one-line message. Never a silent fallback to a world average."""
    if not isinstance(code, str) or not re.fullmatch(r'[A-Z]{3}', code):
        letters = isinstance(code, str) and re.fullmatch(r'[A-Za-z]{3}', code)
        hint = f' (did you mean {code.upper()!r}?)' if letters else ''
        raise ValueError(f'country code must be ISO 3166-1 alpha-3, 3 uppercase letters such as USA, FRA, DEU; '
                         f'got {code!r}{hint}')
    if _import_codecarbon() is not None:
        from codecarbon.input import DataSource
        if code not in DataSource().get_global_energy_mix_data():
            raise ValueError(f'unknown country code {code!r}: not in codecarbon\'s carbon-intensity table '
                             f'(ISO 3166-1 alpha-3, e.g. USA, FRA, DEU)')
    return code


class EnergyMeter:
    """Cumulative energy and emissions over one or more measured spans (`start()` ... `stop()`, or `with meter:`).

    Attributes:
        available: codecarbon is installed, so spans are measured.
        country_iso_code: the grid whose carbon intensity turns kWh into kg CO2eq.
        kwh: energy of all measured spans in kWh (None when not available).
        co2_kg: emissions of all measured spans in kg CO2eq (None when not available).
        method: how codecarbon got the power, e.g. 'RAM: estimate, CPU: RAPL, GPU: NVML / AMD SMI' (None before a span).
    """

    def __init__(self, country_iso_code: str = 'USA', kwh: float = 0.0, co2_kg: float = 0.0) -> None:
        """`kwh` / `co2_kg`: totals to continue from (a resumed run). Raises ValueError for a bad country code."""
        self.country_iso_code = check_country_code(country_iso_code)
        self.available = _import_codecarbon() is not None
        self.kwh: Optional[float] = float(kwh) if self.available else None
        self.co2_kg: Optional[float] = float(co2_kg) if self.available else None
        self.method: Optional[str] = None
        self._tracker = None

    def start(self) -> None:
        """Begin a span (nothing when codecarbon is not installed)."""
        if not self.available or self._tracker is not None:
            return
        from codecarbon import OfflineEmissionsTracker
        tracker = OfflineEmissionsTracker(
            country_iso_code=self.country_iso_code,
            output_methods=[],  # no CSV in the CWD, no API, no logger output (save_to_file=False, not deprecated)
            emissions_endpoint=None,
            electricitymaps_api_token=None,
            output_dir=tempfile.gettempdir(),  # never the CWD, whatever a codecarbon config says
            tracking_mode='machine',
            allow_multiple_runs=True,  # no lock file; two runs on one machine each measure it
            log_level='error',
            project_name='timm-dbp',
        )
        # A token from a codecarbon config file or CODECARBON_* variable would make the offline tracker call the
        # Electricity Maps API; the offline table is the point here.
        if getattr(tracker, '_electricitymaps_api_token', None) is not None:
            tracker._electricitymaps_api_token = None
        tracker.start()
        self._tracker = tracker

    def stop(self) -> None:
        """End the span and add its energy and emissions to the totals."""
        tracker, self._tracker = self._tracker, None
        if tracker is None:
            return
        tracker.stop()
        data = getattr(tracker, 'final_emissions_data', None)  # codecarbon swallows its own errors
        if data is None:
            _logger.warning('codecarbon measured nothing for this span: energy totals leave it out')
            return
        self.kwh += float(data.energy_consumed)
        self.co2_kg += float(data.emissions)
        if self.method is None:
            self.method = _method_of(tracker)

    def __enter__(self) -> 'EnergyMeter':
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _method_of(tracker: Any) -> Optional[str]:
    """How the tracker measures, from its hardware list (codecarbon keeps it private: None if that changes)."""
    parts = []
    for hw in getattr(tracker, '_hardware', None) or []:
        kind = type(hw).__name__
        if kind == 'CPU':
            mode = getattr(hw, '_mode', None)
            parts.append(f'CPU: {_CPU_METHODS.get(mode, mode)}')
        elif kind == 'GPU':
            parts.append('GPU: NVML / AMD SMI')
        elif kind == 'RAM':
            parts.append('RAM: estimate')
        else:
            parts.append(kind)
    return ', '.join(parts) or None
