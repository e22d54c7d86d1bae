"""Metrics: a mean over seeds with its 95% interval, and the Visual Decathlon score (Rebuffi et al., 2017),
as used in the SpotTune paper's Table 3.

    S = sum_d 1000 * max(0, E_max_d - E_d)^2 / E_max_d^2,   E_max_d = 2 * (baseline error on d)

E_d is the test error on domain d. The baseline (fine-tuning of an ImageNet ResNet-26) scores 250 per
domain, 2500 over the ten domains; a perfect domain scores 1000; an error at or above twice the
baseline's scores 0.
"""
import math
import re
import statistics


def mean_interval(values, level=0.95):
    """(mean, half-width of the two-sided Student-t interval at `level`) of independent runs' values; the
    half-width is nan for a single value. Needs scipy (the `data` extra)."""
    from scipy import stats
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval: no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))

# Test accuracy (%) of the reference fine-tuning baseline, per Decathlon domain (devkit names).
DECATHLON_BASELINE_ACCURACY = {
    "imagenet12": 59.87,
    "aircraft": 60.34,
    "cifar100": 82.12,
    "daimlerpedcls": 92.82,
    "dtd": 55.53,
    "gtsrb": 97.53,
    "vgg-flowers": 81.41,
    "omniglot": 87.69,
    "svhn": 96.55,
    "ucf101": 51.20,
}
DECATHLON_BASELINE_ERRORS = {d: round(1 - a / 100, 6) for d, a in DECATHLON_BASELINE_ACCURACY.items()}

# Other spellings of the domains (compared lower-case, without punctuation).
_ALIASES = {"imagenet": "imagenet12", "daimler": "daimlerpedcls", "dped": "daimlerpedcls",
            "flowers": "vgg-flowers", "vggflowers": "vgg-flowers", "flwr": "vgg-flowers"}
_CANONICAL = {re.sub(r"[^a-z0-9]", "", d): d for d in DECATHLON_BASELINE_ACCURACY}


def _decathlon_name(domain):
    key = re.sub(r"[^a-z0-9]", "", str(domain).lower())
    return _ALIASES.get(key) or _CANONICAL.get(key)


def _check_error(domain, error, what):
    error = float(error)
    if not 0 <= error <= 1 or math.isnan(error):
        raise ValueError(f"{what} for {domain!r} must be an error rate in [0, 1], got {error}")
    return error


def decathlon_domain_scores(errors, baseline_errors=None):
    """{domain: score in [0, 1000]} for `errors` = {domain: test error in [0, 1]}.

    baseline_errors: {domain: baseline error}; default: the Decathlon baseline for the ten Decathlon
    domains (any common spelling: "ImageNet", "CIFAR-100", "Flowers", ...). A domain outside the table
    needs its own baseline error.
    """
    scores = {}
    for domain, error in errors.items():
        error = _check_error(domain, error, "error")
        if baseline_errors is not None:
            if domain not in baseline_errors:
                raise KeyError(f"decathlon_score: no baseline error for domain {domain!r}")
            baseline = baseline_errors[domain]
        else:
            name = _decathlon_name(domain)
            if name is None:
                raise KeyError(f"decathlon_score: {domain!r} is not a Visual Decathlon domain "
                               f"({sorted(DECATHLON_BASELINE_ACCURACY)}); pass baseline_errors=")
            baseline = DECATHLON_BASELINE_ERRORS[name]
        baseline = _check_error(domain, baseline, "baseline error")
        if baseline == 0:
            raise ValueError(f"decathlon_score: baseline error for {domain!r} is 0, so no error can be scored")
        e_max = 2 * baseline
        scores[domain] = 1000 * max(0.0, e_max - error) ** 2 / e_max ** 2
    return scores


def decathlon_score(errors, baseline_errors=None):
    """Visual Decathlon score: the sum of decathlon_domain_scores (same arguments)."""
    return sum(decathlon_domain_scores(errors, baseline_errors).values())
