/* Device charts with the vendored uPlot: latency percentiles and throughput from /devices/ID/series.json. */
(function () {
  "use strict";

  var COLORS = { p50: "#2f7d4f", p95: "#c98a00", p99: "#c0392b", per_s: "#2b6cb0", errors_per_s: "#c0392b",
                 tokens_per_s: "#7b4fc0" };

  function opts(el, title, series) {
    return {
      width: Math.max(280, el.clientWidth), height: 220, title: "",
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"); },
      scales: { x: { time: true } },
      axes: [{}, { size: 60 }],
      series: [{}].concat(series.map(function (s) {
        return { label: s.label, stroke: COLORS[s.key], width: 1.5, spanGaps: true,
                 value: function (u, v) { return v == null ? "-" : v.toFixed(2); } };
      }))
    };
  }

  function columns(data, series) {
    return [data.t].concat(series.map(function (s) { return data[s.key]; }));
  }

  function setup(box) {
    var url = box.getAttribute("data-series");
    var every = parseInt(box.getAttribute("data-every"), 10) || 10000;
    var defs = {
      latency: [{ key: "p50", label: "p50" }, { key: "p95", label: "p95" }, { key: "p99", label: "p99" }],
      throughput: [{ key: "per_s", label: "inferences/s" }, { key: "errors_per_s", label: "errors/s" }]
    };
    var plots = {};
    var empty = box.parentNode.querySelector(".chart-empty");

    function draw(data) {
      if (data.tokens_per_s.some(function (v) { return v != null; }) && defs.throughput.length === 2) {
        defs.throughput.push({ key: "tokens_per_s", label: "tokens/s" });
        if (plots.throughput) { plots.throughput.destroy(); delete plots.throughput; }
      }
      if (empty) { empty.hidden = data.t.length > 0; }
      var els = box.querySelectorAll("[data-chart]");
      for (var i = 0; i < els.length; i++) {
        var name = els[i].getAttribute("data-chart");
        if (plots[name]) { plots[name].setData(columns(data, defs[name])); }
        else { plots[name] = new uPlot(opts(els[i], name, defs[name]), columns(data, defs[name]), els[i]); }
        els[i].setAttribute("data-points", String(data.t.length));
      }
    }

    window.slmfCharts.follow(url, every, draw, null);
    window.slmfCharts.resizing(box, plots);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var boxes = document.querySelectorAll("[data-series]");
    for (var i = 0; i < boxes.length; i++) { setup(boxes[i]); }
  });
})();
