// tensorstream live dashboard: polls api/state once a second and draws uPlot charts.
// No external resources: uPlot is bundled next to this file.
(function () {
  "use strict";

  var BACKEND_COLORS = { torch: "#ee4c2c", tensorflow: "#1565c0" };
  var PALETTE = ["#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#ad1457", "#5d4037", "#455a64"];
  var MARK_COLORS = { drift: "#d32f2f", model_version: "#1e88e5", checkpoint: "#9e9e9e", rebalance: "#fb8c00" };
  var POLL_MS = 1000;

  // Everything the page knows, for the curious and for tests (window.tsDashboard).
  var dash = {
    seq: null, data: null, polls: 0, updates: 0, errors: 0, charts: {}, points: {},
    // {series label: number of points} of one chart kind ("accuracy", "loss", ...), over all pipelines
    pointsOf: function (kind) {
      var out = {};
      Object.keys(dash.points).forEach(function (id) {
        if (id.split("|")[1] !== kind) return;
        var p = dash.points[id];
        Object.keys(p).forEach(function (k) { out[k] = (out[k] || 0) + p[k]; });
      });
      return out;
    },
  };
  window.tsDashboard = dash;

  var colorIndex = {};
  function colorFor(key) {
    var backend = key.split("/").pop();
    if (BACKEND_COLORS[backend]) return BACKEND_COLORS[backend];
    if (!(key in colorIndex)) colorIndex[key] = Object.keys(colorIndex).length;
    return PALETTE[colorIndex[key] % PALETTE.length];
  }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // [[ [x, y], ... ], ...] -> uPlot's columnar data [xs, ys1, ys2, ...] on the union of the xs
  function align(seriesList) {
    var set = new Set();
    seriesList.forEach(function (s) { s.forEach(function (p) { set.add(p[0]); }); });
    var xs = Array.from(set).sort(function (a, b) { return a - b; });
    var index = new Map(xs.map(function (x, i) { return [x, i]; }));
    var out = [xs];
    seriesList.forEach(function (s) {
      var ys = new Array(xs.length).fill(null);
      s.forEach(function (p) { ys[index.get(p[0])] = p[1]; });
      out.push(ys);
    });
    return out;
  }

  function drawMarkers(u) {
    var marks = u.tsMarkers || [];
    if (!marks.length) return;
    var ctx = u.ctx, b = u.bbox, dpr = window.devicePixelRatio || 1;
    ctx.save();
    marks.forEach(function (m) {
      var x = Math.round(u.valToPos(m.x, "x", true));
      if (!isFinite(x) || x < b.left || x > b.left + b.width) return;
      var color = MARK_COLORS[m.kind] || "#555";
      ctx.strokeStyle = color;
      ctx.lineWidth = (m.kind === "checkpoint" ? 1 : 2) * dpr;
      ctx.setLineDash(m.kind === "checkpoint" ? [2 * dpr, 4 * dpr] : [6 * dpr, 4 * dpr]);
      ctx.beginPath(); ctx.moveTo(x, b.top); ctx.lineTo(x, b.top + b.height); ctx.stroke();
      if (m.kind !== "checkpoint" && m.label) {
        ctx.fillStyle = color;
        ctx.font = 11 * dpr + "px sans-serif";
        ctx.fillText(String(m.label).slice(0, 28), x + 4 * dpr, b.top + 12 * dpr);
      }
    });
    ctx.restore();
  }

  function chartWidth(box) { return Math.max(320, (box.clientWidth || 480) - 10); }

  // spec: {id, title, time, xlabel, series: [{label, color, dash, points}], markers: [{x, kind, label}]}
  function renderChart(box, spec) {
    var withData = spec.series.filter(function (s) { return s.points.length > 0; });
    var counts = {};
    spec.series.forEach(function (s) { counts[s.label] = s.points.length; });
    dash.points[spec.id] = counts;
    box.dataset.points = JSON.stringify(counts);
    box.dataset.series = String(withData.length);
    var existing = dash.charts[spec.id];
    if (!withData.length) {
      if (!existing && !box.querySelector(".placeholder")) box.appendChild(el("div", { "class": "placeholder" }, spec.title + ": no data yet"));
      return;
    }
    var data = align(spec.series.map(function (s) { return s.points; }));
    var signature = spec.title + "|" + spec.series.map(function (s) { return s.label; }).join(",");
    if (existing && existing.tsSignature === signature) {
      existing.tsMarkers = spec.markers;
      existing.setData(data);
      return;
    }
    if (existing) existing.destroy();
    box.textContent = "";
    var many = data[0].length > 40;
    var opts = {
      title: spec.title,
      width: chartWidth(box),
      height: 240,
      scales: { x: { time: !!spec.time }, y: spec.logY ? { distr: 3, log: 10 } : {} },
      series: [{ label: spec.xlabel }].concat(spec.series.map(function (s) {
        return { label: s.label, stroke: s.color, width: 2, dash: s.dash, spanGaps: true,
                 points: { show: !many, size: 5 } };
      })),
      axes: [{ label: spec.time ? undefined : spec.xlabel }, { size: 60 }],
      hooks: { draw: [drawMarkers] },
    };
    var u = new uPlot(opts, data, box);
    u.tsSignature = signature;
    u.tsMarkers = spec.markers;
    dash.charts[spec.id] = u;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "–";
    if (typeof v !== "number") return String(v);
    return digits === undefined ? v.toLocaleString("en-US", { maximumFractionDigits: 0 }) : v.toFixed(digits);
  }

  var COLUMNS = ["run", "status", "records", "rec/s", "lag", "metric", "window", "p50 ms", "p99 ms", "model version"];

  function ensureSection(name) {
    var id = "pipeline-" + name.replace(/[^A-Za-z0-9_-]/g, "_");
    var sec = document.getElementById(id);
    if (sec) return sec;
    var empty = document.getElementById("empty");
    if (empty) empty.remove();
    sec = el("section", { "class": "pipeline", id: id, "data-pipeline": name });
    sec.appendChild(el("h2", {}, name));
    var table = el("table", { "class": "runs" });
    var head = el("tr");
    COLUMNS.forEach(function (c) { head.appendChild(el("th", c === "model version" ? { "class": "version" } : {}, c)); });
    table.appendChild(el("thead")).appendChild(head);
    table.appendChild(el("tbody"));
    sec.appendChild(table);
    var charts = el("div", { "class": "charts" });
    ["accuracy", "loss", "throughput", "lag", "latency"].forEach(function (kind) {
      charts.appendChild(el("div", { "class": "chart", "data-chart": kind, "data-pipeline": name }));
    });
    sec.appendChild(charts);
    document.getElementById("pipelines").appendChild(sec);
    return sec;
  }

  function renderTable(sec, runs) {
    var body = sec.querySelector("tbody");
    body.textContent = "";
    runs.forEach(function (r) {
      var tr = el("tr", { "data-run": r.key });
      var first = el("td");
      var sw = el("span", { "class": "swatch" });
      sw.style.background = colorFor(r.key);
      first.appendChild(sw);
      first.appendChild(document.createTextNode(r.backend));
      tr.appendChild(first);
      var status = r.status === "error" ? "error: " + (r.error || "") : r.status;
      tr.appendChild(el("td", { "class": "status-" + r.status }, status));
      [fmt(r.records), fmt(r.records_per_s), fmt(r.lag),
       (r.metric_name || "") + " " + fmt(r.metric, 4), fmt(r.metric_window, 4),
       fmt(r.latency_p50_ms, 2), fmt(r.latency_p99_ms, 2)].forEach(function (t) { tr.appendChild(el("td", {}, t)); });
      tr.appendChild(el("td", { "class": "version" }, r.model_version || ""));
      body.appendChild(tr);
    });
  }

  function renderPipeline(name, p) {
    var sec = ensureSection(name);
    var runs = Object.keys(p.runs).sort().map(function (k) { return p.runs[k]; });
    renderTable(sec, runs);
    var events = [];
    runs.forEach(function (r) { (r.events || []).forEach(function (e) { events.push(e); }); });
    var byRecords = events.map(function (e) { return { x: e.records, kind: e.kind, label: e.label }; });
    var byTime = events.map(function (e) { return { x: e.t, kind: e.kind, label: e.label }; });
    var metricName = (runs[0] && runs[0].metric_name) || "accuracy";
    var lossName = (runs[0] && runs[0].loss_name) || "loss";
    function col(r, i) { return r.ts.filter(function (row) { return row[i] !== null; }).map(function (row) { return [row[0], row[i]]; }); }
    var box = function (kind) { return sec.querySelector('.chart[data-chart="' + kind + '"]'); };
    var line = function (r, points, suffix, dash) {
      return { label: r.key + (suffix || ""), color: colorFor(r.key), dash: dash, points: points };
    };
    renderChart(box("accuracy"), {
      id: name + "|accuracy", title: "prequential " + metricName + " (window)", xlabel: "records scored",
      series: runs.map(function (r) { return line(r, r.acc); }), markers: byRecords });
    renderChart(box("loss"), {
      id: name + "|loss", title: lossName, xlabel: "records scored",
      series: runs.map(function (r) { return line(r, r.loss); }), markers: byRecords });
    renderChart(box("throughput"), {
      id: name + "|throughput", title: "throughput (records/s)", time: true, xlabel: "time",
      series: runs.map(function (r) { return line(r, col(r, 1)); }), markers: byTime });
    renderChart(box("lag"), {
      id: name + "|lag", title: "consumer lag (records)", time: true, xlabel: "time",
      series: runs.map(function (r) { return line(r, col(r, 2)); }), markers: byTime });
    var lat = [];
    runs.forEach(function (r) {
      lat.push(line(r, col(r, 3), " p50"));
      lat.push(line(r, col(r, 4), " p99", [6, 4]));
    });
    renderChart(box("latency"), {
      id: name + "|latency", title: "latency per record (ms, log scale)", time: true, xlabel: "time", series: lat,
      markers: byTime, logY: true });
  }

  function setStatus(state, text) {
    var s = document.getElementById("status");
    s.dataset.state = state;
    s.textContent = text;
  }

  function render(d) {
    if (d.title) document.title = d.title + " · live";
    Object.keys(d.pipelines).forEach(function (name) { renderPipeline(name, d.pipelines[name]); });
  }

  function poll() {
    var url = "api/state" + (dash.seq === null ? "" : "?seq=" + dash.seq);
    fetch(url, { cache: "no-store" }).then(function (r) {
      dash.polls += 1;
      if (r.status === 204) { setStatus("idle", "live · no change"); return null; }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    }).then(function (d) {
      if (d) {
        dash.seq = d.seq; dash.data = d; dash.updates += 1;
        render(d);
        setStatus("live", "live · " + new Date().toLocaleTimeString());
      }
    }).catch(function (e) {
      dash.errors += 1;
      setStatus("disconnected", "disconnected (" + e.message + ")");
    }).finally(function () { setTimeout(poll, POLL_MS); });
  }

  window.addEventListener("resize", function () {
    Object.keys(dash.charts).forEach(function (id) {
      var u = dash.charts[id];
      u.setSize({ width: chartWidth(u.root.parentNode), height: 240 });
    });
  });

  poll();
})();
