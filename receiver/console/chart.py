"""The overview's activity chart as plain SVG shapes (rendered by the template, no script)."""
from datetime import datetime, timezone

WIDTH, HEIGHT, AXIS = 640, 180, 20


def activity_chart(activity):
    """Grouped bars per time slice: received, then applied per sink; ``{"bars", "labels", "series", "top"}``."""
    series = [("received", activity["received"])] + sorted(activity["applied"].items())
    slices = len(activity["starts"])
    top = max([1] + [count for _, counts in series for count in counts])
    slot = WIDTH / slices
    bar = (slot - 4) / len(series)
    bars = []
    for i in range(slices):
        for j, (name, counts) in enumerate(series):
            height = (HEIGHT - AXIS) * counts[i] / top
            bars.append({"x": round(i * slot + 2 + j * bar, 1), "y": round(HEIGHT - AXIS - height, 1),
                         "width": round(max(bar - 1, 1), 1), "height": round(height, 1), "series": j,
                         "title": f"{name}: {counts[i]} from {_clock(activity['starts'][i])}"})
    labels = [{"x": round(i * slot + 2, 1), "text": _clock(start)}
              for i, start in enumerate(activity["starts"]) if i % 2 == 0]
    return {"bars": bars, "labels": labels, "series": [name for name, _ in series], "top": top,
            "width": WIDTH, "height": HEIGHT, "baseline": HEIGHT - AXIS}


def _clock(epoch):
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%H:%M")
