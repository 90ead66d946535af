/* Fleet health charts with the vendored uPlot: rates, latency, errors, labels, scores and drift of one
   model version, from /health/MODEL/VERSION/series.json. */
(function () {
  "use strict";

  var PALETTE = ["#2b6cb0", "#2f9e5f", "#c98a00", "#c0392b", "#7b4fc0", "#138d90", "#b35c1e", "#5c6a7a", "#aab4bf"];

  function fmt(digits) {
    return function (u, v) { return v == null ? "-" : v.toFixed(digits); };
  }

  /* Points where a line alone would hide values: a sparse series has isolated ones between gaps. */
  function sparse(values) {
    return values.filter(function (v) { return v != null; }).length <= 90;
  }

  function timeOpts(el, series, columns) {
    return {
      width: Math.max(280, el.clientWidth), height: 220,
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },
      scales: { x: { time: true } },
      axes: [{}, { size: 60 }],
      series: [{}].concat(series.map(function (s, i) {
        var color = s.color || PALETTE[i % PALETTE.length];
        return { label: s.label, stroke: color, width: s.width || 1.5, dash: s.dash, spanGaps: false,
                 points: { show: !s.dash && sparse(columns[i + 1]), size: 5, stroke: color, fill: color },
                 value: fmt(s.digits == null ? 2 : s.digits) };
      }))
    };
  }

  function pct(values) { return values.map(function (v) { return v == null ? null : v * 100; }); }
  function constant(t, value) { return t.map(function () { return value; }); }

  function charts(data) {
    var t = data.t;
    var out = {
      rate: { series: [{ label: "inferences/s" }, { label: "errors/s", color: "#c0392b" }],
              columns: [t, data.per_s, data.errors_per_s] },
      latency: { series: [{ label: "p50 ms", color: "#2f7d4f" }, { label: "p95 ms", color: "#c98a00" }],
                 columns: [t, data.p50, data.p95] },
      errors: { series: [{ label: "error rate %", color: "#c0392b", digits: 3 }], columns: [t, pct(data.error_rate)] },
      labels: { series: data.labels.names.map(function (n) { return { label: n, digits: 1 }; }),
                columns: [t].concat(data.labels.shares.map(pct)) },
      scores: { series: [{ label: "p10" }, { label: "p50", width: 2 }, { label: "p90" }],
                columns: [t, data.scores.q10, data.scores.q50, data.scores.q90] },
      drift: { series: [{ label: "labels PSI", digits: 3 }, { label: "scores PSI", digits: 3 },
                        { label: "0.1", color: "#c98a00", dash: [4, 4], width: 1 },
                        { label: "0.25", color: "#c0392b", dash: [4, 4], width: 1 }],
               columns: [t, data.psi.labels, data.psi.scores, constant(t, 0.1), constant(t, 0.25)] }
    };
    return out;
  }

  function histogram(el, data) {
    var edges = data.scores.edges;
    var mids = [];
    for (var i = 0; i + 1 < edges.length; i++) { mids.push((edges[i] + edges[i + 1]) / 2); }
    var bars = uPlot.paths && uPlot.paths.bars ? uPlot.paths.bars({ size: [0.45, 40], align: 0 }) : null;
    var opts = {
      width: Math.max(280, el.clientWidth), height: 220,
      scales: { x: { time: false } },
      axes: [{ label: "score" }, { size: 60, values: function (u, vals) { return vals.map(function (v) { return (v * 100).toFixed(0) + "%"; }); } }],
      series: [{ value: fmt(3) },
               { label: "first quarter", stroke: "#2b6cb0", fill: "rgba(43,108,176,0.35)", paths: bars, value: fmt(3) },
               { label: "last quarter", stroke: "#c0392b", fill: "rgba(192,57,43,0.35)", paths: bars, value: fmt(3) }]
    };
    var ref = data.scores.reference.length ? data.scores.reference : mids.map(function () { return null; });
    var recent = data.scores.recent.length ? data.scores.recent : mids.map(function () { return null; });
    return { opts: opts, columns: [mids, ref, recent] };
  }

  function setup(box) {
    var url = box.getAttribute("data-health");
    var every = parseInt(box.getAttribute("data-every"), 10) || 30000;
    var plots = {};
    var first = document.getElementById("health-data");

    function draw(data) {
      var defs = charts(data);
      var els = box.querySelectorAll("[data-chart]");
      for (var i = 0; i < els.length; i++) {
        var el = els[i];
        var name = el.getAttribute("data-chart");
        var made;
        if (name === "histogram") {
          made = histogram(el, data);
        } else if (defs[name]) {
          made = { opts: timeOpts(el, defs[name].series, defs[name].columns), columns: defs[name].columns };
        } else {
          continue;
        }
        if (plots[name]) { plots[name].destroy(); }  // label sets can change between loads
        plots[name] = new uPlot(made.opts, made.columns, el);
        var points = made.columns[1].filter(function (v) { return v != null; }).length;
        el.setAttribute("data-points", String(points));
      }
      box.setAttribute("data-loaded", new Date().toISOString());
    }

    window.slmfCharts.follow(url, every, draw, first ? JSON.parse(first.textContent) : null);
    window.slmfCharts.resizing(box, plots);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var boxes = document.querySelectorAll("[data-health]");
    for (var i = 0; i < boxes.length; i++) { setup(boxes[i]); }
  });
})();
