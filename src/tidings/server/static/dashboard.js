// Tidings dashboard: polls /api/metrics once a second and draws small SVG line charts.
// Dependency-free on purpose: the server ships this file as package data, no CDN, no build step.
(function () {
  "use strict";

  var WINDOW_S = 120; // seconds shown on every chart
  var POLL_MS = 1000;
  // With METRICS_JWT_SECRET set the page is opened as /?token=<jwt>: the token goes on to /api/metrics.
  var TOKEN = new URLSearchParams(location.search).get("token");
  var METRICS_HEADERS = TOKEN ? { Authorization: "Bearer " + TOKEN } : {};
  var SVG_NS = "http://www.w3.org/2000/svg";
  var H = 180;
  var PAD = { l: 46, r: 10, t: 10, b: 20 };

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVG_NS, name);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }

  // 1, 2, 5 x 10^k at or above v: round axis maxima.
  function niceCeil(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || isNaN(v)) return "–";
    if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(1) + "k";
    var d = digits === undefined ? (v % 1 === 0 ? 0 : Math.abs(v) < 10 ? 2 : 1) : digits;
    return Number(v).toFixed(d);
  }

  function LineChart(figure, series) {
    this.figure = figure;
    this.series = series;
    this.svg = el("svg", { role: "img", "aria-label": figure.querySelector("figcaption").textContent });
    figure.appendChild(this.svg);
    this.grid = el("g", {}, this.svg);
    this.paths = series.map(function (s) {
      return el("path", { class: "series", stroke: s.color, "data-key": s.key }, this.svg);
    }, this);
    // The newest value of each series as a dot: visible even while a line has a single point.
    this.dots = series.map(function (s) {
      return el("circle", { r: 2.5, fill: s.color, visibility: "hidden" }, this.svg);
    }, this);
    var legend = document.createElement("div");
    legend.className = "legend";
    this.labels = series.map(function (s) {
      var span = document.createElement("span");
      span.style.setProperty("--c", s.color);
      legend.appendChild(span);
      return span;
    });
    figure.appendChild(legend);
  }

  LineChart.prototype.render = function (points) {
    var w = this.svg.clientWidth || 600;
    this.svg.setAttribute("viewBox", "0 0 " + w + " " + H);
    var now = points.length ? points[points.length - 1].t : Date.now() / 1000;
    var t0 = now - WINDOW_S;
    var max = 0;
    this.series.forEach(function (s) {
      points.forEach(function (p) {
        var v = p[s.key];
        if (v !== null && v !== undefined && v > max) max = v;
      });
    });
    var top = niceCeil(max);
    var iw = w - PAD.l - PAD.r;
    var ih = H - PAD.t - PAD.b;
    var x = function (t) { return PAD.l + ((t - t0) / WINDOW_S) * iw; };
    var y = function (v) { return PAD.t + ih - (v / top) * ih; };

    while (this.grid.firstChild) this.grid.removeChild(this.grid.firstChild);
    for (var i = 0; i <= 4; i++) {
      var v = (top * i) / 4;
      el("line", { class: "grid-line", x1: PAD.l, x2: w - PAD.r, y1: y(v), y2: y(v) }, this.grid);
      var label = el("text", { class: "axis", x: PAD.l - 6, y: y(v) + 3, "text-anchor": "end" }, this.grid);
      label.textContent = fmt(v);
    }
    [WINDOW_S, 60, 0].forEach(function (ago) {
      var t = el("text", { class: "axis", x: x(now - ago), y: H - 4, "text-anchor": ago === 0 ? "end" : "start" }, this.grid);
      t.textContent = ago === 0 ? "now" : "-" + ago + "s";
    }, this);

    this.series.forEach(function (s, idx) {
      var d = "";
      var pen = false;
      points.forEach(function (p) {
        var v = p[s.key];
        if (v === null || v === undefined || p.t < t0) { pen = false; return; }
        d += (pen ? "L" : "M") + x(p.t).toFixed(1) + " " + y(v).toFixed(1);
        pen = true;
      });
      this.paths[idx].setAttribute("d", d);
      var last = null;
      var dot = this.dots[idx];
      dot.setAttribute("visibility", "hidden");
      for (var j = points.length - 1; j >= 0; j--) {
        if (points[j][s.key] !== null && points[j][s.key] !== undefined) {
          last = points[j][s.key];
          if (points[j].t >= t0) {
            dot.setAttribute("cx", x(points[j].t).toFixed(1));
            dot.setAttribute("cy", y(last).toFixed(1));
            dot.setAttribute("visibility", "visible");
          }
          break;
        }
      }
      this.labels[idx].textContent = s.label + " " + fmt(last);
    }, this);
    this.figure.dataset.points = String(points.length);
    this.figure.dataset.last = String(now);
    this.figure.dataset.max = String(max);
  };

  var C = { blue: "#58a6ff", green: "#3fb950", orange: "#d29922", red: "#f85149", purple: "#bc8cff" };
  var charts = {
    connections: new LineChart(document.getElementById("chart-connections"), [
      { key: "connections", label: "connections", color: C.blue },
      { key: "channels", label: "channels", color: C.purple },
    ]),
    rates: new LineChart(document.getElementById("chart-rates"), [
      { key: "messagesIn", label: "in", color: C.blue },
      { key: "messagesOut", label: "out", color: C.green },
      { key: "broadcasts", label: "broadcasts", color: C.purple },
      { key: "failed", label: "failed", color: C.red },
    ]),
    rtt: new LineChart(document.getElementById("chart-rtt"), [
      { key: "rttP50", label: "p50", color: C.green },
      { key: "rttP95", label: "p95", color: C.orange },
      { key: "rttP99", label: "p99", color: C.red },
    ]),
    delivery: new LineChart(document.getElementById("chart-delivery"), [
      { key: "deliveryP50", label: "p50", color: C.green },
      { key: "deliveryP95", label: "p95", color: C.orange },
      { key: "deliveryP99", label: "p99", color: C.red },
    ]),
  };

  function setText(id, text) {
    var node = document.getElementById(id);
    if (node && node.textContent !== text) node.textContent = text;
  }

  function ago(seconds) {
    if (seconds < 60) return Math.round(seconds) + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }

  function renderAlerts(m) {
    var list = document.getElementById("alerts");
    list.textContent = "";
    if (!m.alerts.length) {
      var ok = document.createElement("li");
      ok.className = "ok";
      ok.textContent = "No active alerts";
      list.appendChild(ok);
    }
    m.alerts.forEach(function (a) {
      var li = document.createElement("li");
      li.className = "firing";
      li.dataset.alert = a.name;
      var name = document.createElement("strong");
      name.textContent = a.name.replace(/_/g, " ");
      var since = document.createElement("span");
      since.className = "since";
      since.textContent = "since " + ago(m.timestamp - a.since);
      li.appendChild(name);
      li.appendChild(document.createTextNode(": " + a.message));
      li.appendChild(since);
      list.appendChild(li);
    });
    var t = m.thresholds;
    setText(
      "thresholds",
      "Thresholds: p95 latency > " + fmt(t.p95LatencyMs) + " ms · reconnect rate > " + fmt(t.reconnectRate * 100, 0) +
        " % · failure rate > " + fmt(t.failureRate * 100, 0) + " % · queue > " + t.queueSize +
        " · window " + m.windowSeconds + " s"
    );
  }

  function renderChannels(rows) {
    var body = document.querySelector("#channels tbody");
    body.textContent = "";
    if (!rows.length) {
      var empty = document.createElement("tr");
      var td = document.createElement("td");
      td.colSpan = 3;
      td.className = "muted";
      td.textContent = "No channels";
      empty.appendChild(td);
      body.appendChild(empty);
      return;
    }
    rows.forEach(function (r) {
      var tr = document.createElement("tr");
      // A "hidden" row sums up the private channels whose names a caller without a token may not see.
      var name = r.hidden ? r.channel + " (names hidden)" : r.channel + (r.private ? " (private)" : "");
      [name, String(r.subscribers), fmt(r.messagesPerSecond, 1)].forEach(
        function (text, i) {
          var td = document.createElement("td");
          if (i) td.className = "num";
          td.textContent = text;
          tr.appendChild(td);
        }
      );
      body.appendChild(tr);
    });
  }

  function pct(rate) {
    var p = rate * 100;
    return (p < 10 && p % 1 !== 0 ? p.toFixed(1) : p.toFixed(0)) + " %";
  }

  function ms(v) {
    return v === null || v === undefined ? "–" : fmt(v, v < 10 ? 2 : 0) + " ms";
  }

  function render(m) {
    setText("node", "node " + m.node + " · up " + fmt(m.uptimeSeconds / 60, 1) + " min");
    setText("stat-connections", String(m.activeConnections));
    setText("stat-channels", String(m.channels));
    setText("stat-in", fmt(m.rates.messagesIn, 1));
    setText("stat-out", fmt(m.rates.messagesOut, 1));
    setText("stat-p95", ms(m.p95Latency));
    setText("stat-delivery", ms(m.deliveryLatency.p95));
    // The same share as /api/metrics and the alert: reconnects of the window's connections.
    var rc = m.reconnects;
    setText("stat-reconnect", pct(m.reconnectRate) + (rc ? " · " + rc.count + "/" + rc.connections : ""));
    setText("stat-failed", fmt(m.failedMessages) + " · " + pct(m.failureRate));
    setText("stat-queue", String(m.messageQueueSize));
    Object.keys(charts).forEach(function (k) { charts[k].render(m.history); });
    renderAlerts(m);
    renderChannels(m.topChannels);
  }

  var feed = document.getElementById("feed");
  function setFeed(state, text) {
    feed.dataset.state = state;
    feed.textContent = text;
  }

  function poll() {
    fetch("/api/metrics?history=" + WINDOW_S, { cache: "no-store", headers: METRICS_HEADERS })
      .then(function (r) {
        if (r.status === 401) throw new Error("HTTP 401: open this page with ?token=<metrics JWT>");
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (m) {
        render(m);
        setFeed("live", "live");
      })
      .catch(function (err) {
        setFeed("error", "metrics unavailable (" + err.message + "), retrying");
      })
      .then(function () { setTimeout(poll, POLL_MS); });
  }
  poll();
})();
