/* parts report: the interactive parts of the pages.
 *
 * The numbers come from data/*.js (window.PARTS_OVERVIEW, window.PARTS_TASK); per-layer details and
 * attention arrive on demand through PartsReport.addDetail / addAttention from scripts loaded by
 * <script> tags, which work from disk where fetch() would not. A task page's state lives in its
 * URL's hash: #run=2&component=L3H5 (no run: the mean over runs).
 */
(function () {
  "use strict";
  var CONFIG = {displaylogo: false, responsive: true};
  var details = {};   // task key -> layer -> {component: {edges, counts, weights}}
  var attention = {}; // task key -> {examples, heads}
  var waiting = {};   // script src -> callbacks

  function count(n, noun) { return n + " " + noun + (n === 1 ? "" : "s"); }
  function pct(x, digits) {
    return x === null || x === undefined ? "–" : (100 * x).toFixed(digits === undefined ? 1 : digits) + "%";
  }
  function esc(text) {
    return String(text).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }
  function loadScript(src, ready, done) {
    if (ready()) { done(); return; }
    if (waiting[src]) { waiting[src].push(done); return; }
    waiting[src] = [done];
    var tag = document.createElement("script");
    tag.src = src;
    tag.onload = function () { var calls = waiting[src]; delete waiting[src]; calls.forEach(function (f) { f(); }); };
    document.body.appendChild(tag);
  }
  function grid(rows, cols) {
    var out = [];
    for (var r = 0; r < rows; r++) { out.push(new Array(cols).fill(null)); }
    return out;
  }
  function layout(title, extra) {
    var base = {title: {text: title, x: 0.01, xanchor: "left", font: {size: 14}}, template: "plotly_white",
                font: {family: "Liberation Sans, Arial, sans-serif", size: 12}, height: 320,
                margin: {l: 55, r: 15, t: 60, b: 60}, legend: {orientation: "h", y: -0.25}};
    return Object.assign(base, extra || {});
  }
  // On a phone a long figure title would run off the figure's edge: break its first line into lines that fit.
  function fitTitle(figureLayout) {
    var title = figureLayout.title, text = title && (typeof title === "string" ? title : title.text);
    var limit = Math.floor((window.innerWidth - 40) / 9);  // characters of a ~16 px title per line
    if (!text || window.innerWidth > 700) { return figureLayout; }
    var pieces = text.split("<br>"), lines = [""];
    pieces[0].split(" ").forEach(function (word) {
      var last = lines[lines.length - 1];
      if (last && (last + " " + word).length > limit) { lines.push(word); } else { lines[lines.length - 1] = last ? last + " " + word : word; }
    });
    pieces[0] = lines.join("<br>");
    figureLayout.title = Object.assign(typeof title === "string" ? {} : title, {text: pieces.join("<br>")});
    if (figureLayout.margin && figureLayout.margin.t !== undefined) { figureLayout.margin.t += 18 * (lines.length - 1); }
    return figureLayout;
  }
  function hline(y, color, dash) {
    return {type: "line", xref: "paper", x0: 0, x1: 1, y0: y, y1: y, line: {color: color, width: 1, dash: dash}};
  }

  // -- the overview ------------------------------------------------------------------------------
  function overview() {
    var data = window.PARTS_OVERVIEW;
    if (data && data.figure) {
      Plotly.newPlot("overview-figure", data.figure.data, fitTitle(data.figure.layout), CONFIG);
    }
  }

  // -- a task page -------------------------------------------------------------------------------
  function task() {
    var T = window.PARTS_TASK;
    var index = {};
    T.components.forEach(function (name, i) { index[name] = i; });
    var state = {view: null, component: null};
    var select = document.getElementById("run-select");
    var heatmap = document.getElementById("heatmap");
    var section = document.getElementById("component");
    var templateColors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
    var labelColors = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#000000"];

    function accuracyOf(view) { return view < 0 ? T.mean.accuracy : T.accuracy[view]; }
    function sharesOf(view, c) { return view < 0 ? T.mean.shares[c] : T.shares[view][c]; }
    function viewName(view) {
      return view < 0 ? "mean over " + count(T.runs.length, "run")
                      : "template " + T.runs[view].template + ", seed " + T.runs[view].seed;
    }
    function categoryText(view, c) {
      if (view >= 0) { return T.categories[T.category[view][c]]; }
      var counts = T.categories.map(function () { return 0; });
      T.category.forEach(function (row) { counts[row[c]] += 1; });
      var parts = [];
      T.categories.forEach(function (name, k) { if (counts[k]) { parts.push([counts[k], name]); } });
      parts.sort(function (a, b) { return b[0] - a[0]; });
      return parts.map(function (p) { return p[1] + " in " + p[0]; }).join(", ") + " of " + count(T.runs.length, "run");
    }
    function labelText(view, c) {
      var shares = sharesOf(view, c);
      var order = shares.map(function (s, k) { return k; }).sort(function (a, b) { return shares[b] - shares[a]; });
      return order.map(function (k) { return esc(T.label_names[k]) + " " + pct(shares[k], 0); }).join(" · ");
    }
    var scaleLow = Math.min(T.chance, Math.min.apply(null, T.accuracy.map(function (row) { return Math.min.apply(null, row); })));
    var scaleHigh = Math.max(T.chance, Math.max.apply(null, T.accuracy.map(function (row) { return Math.max.apply(null, row); })));
    if (scaleHigh <= scaleLow) { scaleHigh = scaleLow + 1; }
    function ranking(view) {
      var acc = accuracyOf(view);
      return acc.map(function (a, i) { return i; }).sort(function (a, b) { return acc[b] - acc[a] || a - b; });
    }

    function drawHeatmap() {
      var figure = JSON.parse(JSON.stringify(T.heatmap));
      var acc = accuracyOf(state.view);
      // One grid per panel (heads, MLPs, split experts), each component in its cell (T.cell: trace, layer, column).
      var z = figure.data.map(function (trace) { return grid(T.n_layers, trace.x.length); });
      var custom = figure.data.map(function (trace) { return grid(T.n_layers, trace.x.length); });
      T.components.forEach(function (name, i) {
        var cell = T.cell[i];
        z[cell[0]][cell[1]][cell[2]] = acc[i];
        custom[cell[0]][cell[1]][cell[2]] = [name, labelText(state.view, i), categoryText(state.view, i)];
      });
      figure.data.forEach(function (trace, t) {
        figure.data[t].z = z[t];
        figure.data[t].customdata = custom[t];
        figure.data[t].hovertemplate = "<b>%{customdata[0]}</b><br>accuracy %{z:.1%}<br>predicts %{customdata[1]}" +
                                       "<br>%{customdata[2]}<extra></extra>";
      });
      var bar = state.view < 0 ? T.mean.colorbar : T.runs[state.view].colorbar;
      figure.layout.coloraxis.colorbar.tickvals = bar.tickvals;
      figure.layout.coloraxis.colorbar.ticktext = bar.ticktext;
      figure.layout.title.text = "Accuracy of every component<br><sup>" + esc(viewName(state.view)) + "</sup>";
      figure.layout.width = undefined;
      return Plotly.react(heatmap, figure.data, figure.layout, CONFIG);
    }

    function sparkline(c) {
      // One scale for every row of the task (its lowest to highest accuracy in any run), so rows compare.
      var w = 150, h = 30, n = T.runs.length, step = n > 1 ? (w - 8) / (n - 1) : 0;
      var y = function (a) { return (h - 3 - (a - scaleLow) / (scaleHigh - scaleLow) * (h - 6)).toFixed(1); };
      var points = T.accuracy.map(function (row, r) { return (4 + r * step).toFixed(1) + "," + y(row[c]); });
      var title = T.runs.map(function (run, r) { return run.label + " " + pct(T.accuracy[r][c]); }).join("\n");
      var dot = n === 1 ? '<circle cx="4" cy="' + y(T.accuracy[0][c]) + '" r="2.5" class="dot"/>' : state.view >= 0
        ? '<circle cx="' + (4 + state.view * step).toFixed(1) + '" cy="' + y(T.accuracy[state.view][c]) + '" r="3" class="dot"/>'
        : "";
      return '<svg class="spark" width="' + w + '" height="' + h + '" viewBox="0 0 ' + w + " " + h + '"><title>' + esc(title) +
             '</title><line x1="0" x2="' + w + '" y1="' + y(T.chance) + '" y2="' + y(T.chance) + '" class="chance"/>' +
             '<polyline points="' + points.join(" ") + '"/>' + dot + "</svg>";
    }
    function meanSd(c) {
      var values = T.accuracy.map(function (row) { return row[c]; });
      var mean = values.reduce(function (s, v) { return s + v; }, 0) / values.length;
      var sd = values.length > 1 ? Math.sqrt(values.reduce(function (s, v) { return s + (v - mean) * (v - mean); }, 0) /
                                             (values.length - 1)) : 0;
      return pct(mean) + " ± " + pct(sd);
    }
    function drawTables() {
      var order = ranking(state.view), acc = accuracyOf(state.view), n = Math.min(10, order.length);
      var fill = function (id, chosen, ranks) {
        document.querySelector("#" + id + " tbody").innerHTML = chosen.map(function (c, k) {
          var category = state.view >= 0 ? T.categories[T.category[state.view][c]] : categoryText(state.view, c);
          return '<tr data-component="' + esc(T.components[c]) + '"' + (T.components[c] === state.component ? ' class="open"' : "") +
                 "><td>" + ranks[k] + "</td><td><b>" + esc(T.components[c]) + "</b></td><td>" + pct(acc[c]) + "</td><td>" +
                 meanSd(c) + "</td><td>" + sparkline(c) + "</td><td>" + esc(category) + "</td></tr>";
        }).join("");
      };
      fill("top-table", order.slice(0, n), order.slice(0, n).map(function (c, k) { return k + 1; }));
      var bottom = order.slice(order.length - n).reverse();
      fill("bottom-table", bottom, bottom.map(function (c, k) { return order.length - k; }));
      document.getElementById("ranking-view").textContent = "(" + viewName(state.view) + ")";
    }

    // -- the component view
    function layerScript(layer) { return "data/" + T.key + "/layer-" + layer + ".js"; }
    function describe(c) {
      var rank = ranking(state.view).indexOf(c) + 1;
      var where = T.kind[c] === "head" ? "attention head " + T.head[c] + " of layer " + T.layer[c]
                : T.kind[c] === "mlp" ? "MLP of layer " + T.layer[c] : "an expert of layer " + T.layer[c] + "'s MLP";
      return where + " · " + esc(viewName(state.view)) + ": rank " + rank + " of " + T.components.length +
             " · predicts " + labelText(state.view, c) + " · " + esc(categoryText(state.view, c));
    }
    function plotRuns(c) {
      var traces = [];
      var templates = [];
      T.runs.forEach(function (run) { if (templates.indexOf(run.template) < 0) { templates.push(run.template); } });
      templates.forEach(function (t, k) {
        var members = T.runs.map(function (run, r) { return r; }).filter(function (r) { return T.runs[r].template === t; });
        traces.push({x: members.map(function (r) { return T.runs[r].label; }), y: members.map(function (r) { return T.accuracy[r][c]; }),
                     mode: "lines+markers", name: "template " + t, marker: {size: 8, color: templateColors[k % 8]},
                     line: {color: templateColors[k % 8], width: 1},
                     hovertemplate: "%{x}: %{y:.1%}<extra>" + T.components[c] + "</extra>"});
      });
      if (T.total_accuracy) {  // runs with total effects (parts effects): the component ablated, beside its direct vote
        var ablated = T.runs.map(function (run, r) { return r; }).filter(function (r) { return T.total_accuracy[r] !== null; });
        traces.push({x: ablated.map(function (r) { return T.runs[r].label; }), y: ablated.map(function (r) { return T.total_accuracy[r][c]; }),
                     mode: "markers", name: "total effect (ablated)", marker: {symbol: "diamond-open", size: 10, color: "#d62728"},
                     hovertemplate: "%{x}: total effect %{y:.1%}<extra>" + T.components[c] + "</extra>"});
      }
      traces.push({x: T.runs.map(function (run) { return run.label; }), y: T.runs.map(function (run) { return run.full_accuracy; }),
                   mode: "markers", name: "full model", marker: {symbol: "line-ew-open", size: 14, color: "#000"},
                   hovertemplate: "%{x}: full model %{y:.1%}<extra></extra>"});
      var shapes = [hline(T.chance, "#777", "dot")];
      if (state.view >= 0) {
        shapes.push({type: "rect", xref: "x", yref: "paper", x0: state.view - 0.45, x1: state.view + 0.45, y0: 0, y1: 1,
                     fillcolor: "#fdd835", opacity: 0.25, line: {width: 0}, layer: "below"});
      }
      Plotly.react("component-runs", traces, layout("Accuracy in every run (dotted: chance, 1 / labels)", {
        shapes: shapes, yaxis: {range: [0, 1.02], tickformat: ".0%"},
        xaxis: {type: "category", categoryorder: "array", categoryarray: T.runs.map(function (run) { return run.label; })}}), CONFIG);
    }
    function plotShares(c) {
      var traces = T.label_names.map(function (name, k) {
        return {type: "bar", name: name, x: T.runs.map(function (run) { return run.label; }),
                y: T.runs.map(function (run, r) { return T.shares[r][c][k]; }), marker: {color: labelColors[k % 8]},
                hovertemplate: "%{x}: predicts " + esc(name) + " on %{y:.0%}<extra></extra>"};
      });
      Plotly.react("component-shares", traces, layout("Share of examples predicted as each label", {
        barmode: "stack", yaxis: {range: [0, 1], tickformat: ".0%"}, xaxis: {type: "category"}}), CONFIG);
    }
    function plotMargins(c, detail) {
      var groups = T.histogram.groups, chosen;
      if (state.view < 0) {
        chosen = groups.map(function (g, k) { return k; });
      } else {
        chosen = [groups.findIndex(function (g) { return g.runs.indexOf(state.view) >= 0; })];
      }
      var bins = T.histogram.bins, low = detail.edges[0], width = (detail.edges[1] - detail.edges[0]) / bins;
      var centres = [];
      for (var b = 0; b < bins; b++) { centres.push(low + (b + 0.5) * width); }
      var traces = T.label_names.map(function (name, gold) {
        var counts = new Array(bins).fill(0);
        chosen.forEach(function (g) { detail.counts[g][gold].forEach(function (v, b) { counts[b] += v; }); });
        return {type: "bar", name: "gold " + name, x: centres, y: counts, width: width, opacity: 0.6,
                marker: {color: labelColors[gold % 8]},
                hovertemplate: "gold " + esc(name) + "<br>%{x:.2f}: %{y} examples<extra></extra>"};
      });
      var label = state.view < 0 ? "all runs" : groups[chosen[0]].label;
      var shapes = low < 0 && detail.edges[1] > 0
        ? [{type: "line", x0: 0, x1: 0, yref: "paper", y0: 0, y1: 1, line: {color: "#555", dash: "dot", width: 1}}] : [];
      Plotly.react("component-margins", traces, layout("Vote margin by gold label (" + esc(label) + ")", {
        barmode: "overlay", shapes: shapes, legend: {orientation: "h", x: 1, xanchor: "right", y: 1.02, yanchor: "bottom"}, xaxis: {title: {text: esc(T.histogram.axis)}}, yaxis: {title: {text: "examples"}}}),
        CONFIG);
    }
    function plotWeights(c, detail) {
      var target = document.getElementById("component-weights");
      if (!T.weights.length) {
        Plotly.purge(target);
        target.innerHTML = '<p class="note empty">No learned weights: run <code>parts evaluate</code> with this sweep\'s ' +
                           "<code>--out</code> to add component reweighting.</p>";
        return;
      }
      target.innerHTML = "";
      var traces = T.weights.map(function (budget, k) {
        return {type: "bar", name: budget === "oracle" ? "oracle (fitted on the test set)" : budget + " labels",
                x: T.runs.map(function (run) { return run.label; }), y: detail.weights[budget],
                marker: {color: ["#1a9850", "#91cf60", "#d9ef8b", "#999"][k % 4]},
                hovertemplate: "%{x}: weight %{y:.2f}<extra></extra>"};
      });
      Plotly.react(target, traces, layout("Reweighting weight (clipped to [0, 1])", {
        barmode: "group", yaxis: {range: [0, 1.05]}, xaxis: {type: "category"}}), CONFIG);
    }
    // The prompt's tokens coloured by their contribution to the head's vote for the label it predicts: blue for,
    // red against, white at zero, the scale set by the example's largest |contribution|.
    function tokenColours(example, votes, label, k) {
      var box = document.createElement("div");
      box.className = "token-colours";
      box.id = "token-colours-" + k;
      var scale = Math.max.apply(null, votes.map(Math.abs).concat([1e-12]));
      var html = '<p class="note">Each token\'s contribution to this head\'s vote for <b>' + esc(label) +
        "</b> (its logit minus the labels' mean; contributions sum to the head's vote): blue for, red against, " +
        "strongest \u00b1" + scale.toPrecision(2) + ".</p><p class=\"tokens\">";
      example.tokens.forEach(function (token, p) {
        var v = votes[p] / scale, w = Math.round(255 * (1 - Math.min(1, Math.abs(v))));
        var colour = v >= 0 ? "rgb(" + w + "," + w + ",255)" : "rgb(255," + w + "," + w + ")";
        var shown = token.replace(/\n/g, "\u21b5");
        html += '<span class="token" data-vote="' + votes[p] + '" style="background:' + colour + '" title="position ' + p +
          ": " + esc(votes[p].toPrecision(3)) + '">' + esc(shown) + "</span>" + (token.indexOf("\n") >= 0 ? "<br>" : "");
      });
      box.innerHTML = html + "</p>";
      return box;
    }
    function plotAttention(c) {
      var target = document.getElementById("component-attention");
      var name = T.components[c];
      if (T.kind[c] !== "head") { target.innerHTML = ""; return; }
      if (!T.attention) {
        target.innerHTML = '<p class="note">Build the report with <code>--attention</code> to see where the top heads look.</p>';
        return;
      }
      var stored = T.runs[T.attention.run];
      if (T.attention.heads.indexOf(name) < 0) {
        target.innerHTML = '<p class="note">No attention stored for ' + esc(name) + ": it is stored for the " +
          T.attention.heads.length + " heads most accurate on average, in run " + esc(stored.label) + " only: " +
          T.attention.heads.map(function (h) {
            return '<a href="#component=' + esc(h) + (state.view >= 0 ? "&run=" + state.view : "") + '">' + esc(h) + "</a>";
          }).join(", ") + ".</p>";
        return;
      }
      loadScript("data/" + T.key + "/attention.js", function () { return attention[T.key] !== undefined; }, function () {
        if (state.component !== name) { return; }
        var data = attention[T.key], run = T.runs[data.run];
        // Attention is stored for one run: say so whenever another run (or the mean) is chosen above.
        var elsewhere = state.view === data.run ? "" : "Attention is stored for run " + esc(run.label) +
          " only; the run chosen above (" + esc(viewName(state.view)) + ") does not change it. ";
        target.innerHTML = '<h3 id="attention-title">Attention of ' + esc(name) + " from the last token, run " +
          esc(run.label) + " (template " + run.template + ", seed " + run.seed + ")</h3>" +
          '<p class="note">' + elsewhere + 'Bars: attention weight per prompt token. Demonstrations alternate blue shades, the test ' +
          "example is orange, the demonstrations' label words are purple and named.</p>";
        data.examples.forEach(function (example, k) {
          var div = document.createElement("div");
          div.className = "figure attention";
          div.id = "attention-" + k;
          target.appendChild(div);
          var marks = example.label_positions, segment = 0, colors = [];
          example.tokens.forEach(function (token, p) {
            var isLabel = marks.indexOf(p) >= 0;
            colors.push(isLabel ? "#7b3294" : segment >= marks.length ? "#f4a261" : segment % 2 ? "#9ecae1" : "#4292c6");
            if (isLabel) { segment += 1; }
          });
          var pattern = data.heads[name][k];
          var rest = Math.max.apply(null, pattern.slice(1).concat([1e-6]));
          var sink = pattern[0] > 1.5 * rest;
          Plotly.newPlot(div, [{type: "bar", x: example.tokens.map(function (t, p) { return p; }), y: pattern,
            marker: {color: colors, line: {width: 0}}, text: example.tokens.map(function (t) { return esc(JSON.stringify(t)); }),
            textposition: "none", hovertemplate: "position %{x}: %{text}<br>attention %{y:.3f}<extra></extra>"}],
            layout("Example " + example.example + " (gold: " + esc(example.gold) + ")" +
                   (sink ? " · first token " + pattern[0].toFixed(2) + ", off the scale" : ""), {
              height: 260, showlegend: false, xaxis: {title: {text: "prompt position"}},
              yaxis: {title: {text: "attention"}, range: sink ? [0, 1.25 * rest] : undefined},
              annotations: marks.map(function (p) {
                return {x: p, y: Math.min(pattern[p], sink ? 1.2 * rest : pattern[p]), text: esc(example.tokens[p].trim() || "␣"),
                        showarrow: true, arrowhead: 0, ay: -20, font: {size: 10, color: "#7b3294"}};
              })}), CONFIG);
          if (data.contributions) { target.appendChild(tokenColours(example, data.contributions[name][k], data.predicted[name][k], k)); }
        });
      });
    }
    function drawComponent() {
      if (state.component === null) { section.hidden = true; return; }
      var c = index[state.component], name = state.component, acc = accuracyOf(state.view)[c];
      section.hidden = false;
      document.getElementById("component-name").textContent = name;
      var accuracy = document.getElementById("component-accuracy");
      accuracy.textContent = pct(acc);
      accuracy.dataset.value = String(acc);
      document.getElementById("component-facts").innerHTML = describe(c);
      plotRuns(c);
      plotShares(c);
      plotAttention(c);
      var layer = T.layer[c];
      loadScript(layerScript(layer), function () { return (details[T.key] || {})[layer] !== undefined; }, function () {
        if (state.component !== name) { return; }
        var detail = details[T.key][layer][name];
        plotMargins(c, detail);
        plotWeights(c, detail);
        section.dataset.ready = name;
      });
    }

    // -- state in the hash
    function read() {
      var params = new URLSearchParams(location.hash.slice(1));
      var run = params.get("run"), name = params.get("component");
      var view = run !== null && /^\d+$/.test(run) && +run < T.runs.length ? +run : -1;
      return {view: view, component: name !== null && index[name] !== undefined ? name : null};
    }
    function write(view, component) {
      var params = [];
      if (view >= 0) { params.push("run=" + view); }
      if (component !== null) { params.push("component=" + encodeURIComponent(component)); }
      var hash = params.join("&");
      if (location.hash.slice(1) === hash) { apply(); } else { location.hash = hash; }
    }
    function apply() {
      var next = read(), viewChanged = next.view !== state.view, opened = next.component !== state.component;
      state.view = next.view;
      state.component = next.component;
      select.value = state.view < 0 ? "mean" : String(state.view);
      if (viewChanged) { drawHeatmap(); }
      drawTables();
      drawComponent();
      if (opened && state.component !== null) { section.scrollIntoView({block: "start"}); }
    }

    select.addEventListener("change", function () {
      write(select.value === "mean" ? -1 : +select.value, state.component);
    });
    document.getElementById("component-close").addEventListener("click", function (event) {
      event.preventDefault();
      write(state.view, null);
    });
    ["top-table", "bottom-table"].forEach(function (id) {
      document.querySelector("#" + id + " tbody").addEventListener("click", function (event) {
        var row = event.target.closest("tr");
        if (row) { write(state.view, row.dataset.component); }
      });
    });
    window.addEventListener("hashchange", apply);
    Object.keys(T.stability.figures).forEach(function (name) {
      var figure = T.stability.figures[name];
      figure.layout.width = undefined;
      Plotly.newPlot("stability-" + name, figure.data, fitTitle(figure.layout), CONFIG);
    });
    apply();
    heatmap.on("plotly_click", function (event) {
      var point = event.points[0];
      if (point && point.customdata) { write(state.view, point.customdata[0]); }
    });
  }

  window.PartsReport = {
    overview: overview,
    task: task,
    addDetail: function (key, layer, detail) { (details[key] = details[key] || {})[layer] = detail; },
    addAttention: function (key, data) { attention[key] = data; }
  };
})();
