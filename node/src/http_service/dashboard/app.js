// The bootmesh dashboard: polls this server's /api/v1/cluster and /api/v1/nodes (which asks
// the other members) every few seconds and redraws. Data is written with textContent only, so
// nothing a node reports can inject markup.
"use strict";

const REFRESH_MS = 2000;
const STAGES = ["dhcp", "kernel", "plan", "image", "root", "booted"];

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function seconds(ms) {
  return (ms / 1000).toFixed(1);
}

function mebibytes(bytes) {
  return (bytes / 1048576).toFixed(1) + " MiB";
}

function drawCluster(view) {
  document.getElementById("server").textContent = "server " + view.server;
  const health = document.getElementById("health");
  health.textContent = view.ready ? "ready" : "not ready: " + (view.not_ready_because || "?");
  health.className = "badge " + (view.ready ? "ok" : "bad");
  const summary = document.getElementById("cluster-summary");
  const racks = document.getElementById("racks");
  racks.replaceChildren();
  const cluster = view.cluster;
  if (!cluster) {
    summary.textContent = "a single server, not in a cluster";
    return;
  }
  summary.textContent =
    "cluster " + cluster.cluster_name + ": this is server " + cluster.server_id + " (" +
    cluster.role + "), term " + cluster.term + ", leader " +
    (cluster.leader === null || cluster.leader === undefined ? "unknown" : cluster.leader) +
    ", log " + (cluster.last_log_index ?? "-") + ", applied " + (cluster.last_applied ?? "-") +
    ", " + cluster.members.length + " members";
  const byRack = new Map();
  for (const member of cluster.members) {
    const rack = member.rack || "(no rack)";
    if (!byRack.has(rack)) byRack.set(rack, []);
    byRack.get(rack).push(member);
  }
  for (const [rack, members] of [...byRack.entries()].sort()) {
    const box = element("div", "rack");
    box.appendChild(element("h3", null, "rack " + rack));
    for (const member of members) {
      const line = element(
        "div",
        "member" + (member.server_id === cluster.leader ? " leader" : ""),
        "server " + member.server_id + " " + member.address + (member.voter ? "" : " (learner)"),
      );
      box.appendChild(line);
    }
    racks.appendChild(box);
  }
}

function latestStage(node) {
  let latest = null;
  for (const seen of node.stages) {
    if (latest === null || STAGES.indexOf(seen.stage) > STAGES.indexOf(latest)) latest = seen.stage;
  }
  return latest;
}

function drawTimeline(node) {
  const cell = element("td");
  if (node.stages.length === 0) return cell;
  // Without the DHCP ACK (a server that did not answer saw it), times count from the first
  // stage seen.
  const dhcpSeen = node.started_unix_ms !== undefined && node.started_unix_ms !== null;
  const start = dhcpSeen ? node.started_unix_ms : Math.min(...node.stages.map((seen) => seen.at_unix_ms));
  const last = Math.max(...node.stages.map((seen) => seen.at_unix_ms));
  const span = Math.max(last - start, 1);
  const bar = element("div", "timeline");
  const stages = [...node.stages].sort((a, b) => a.at_unix_ms - b.at_unix_ms);
  stages.forEach((seen, index) => {
    const next = index + 1 < stages.length ? stages[index + 1].at_unix_ms : seen.at_unix_ms;
    const segment = element("div", "segment " + seen.stage);
    segment.style.left = (100 * (seen.at_unix_ms - start) / span) + "%";
    segment.style.width = Math.max(100 * (next - seen.at_unix_ms) / span, 0.5) + "%";
    segment.title = seen.stage + " at " + seconds(seen.at_unix_ms - start) + " s (" + seen.server + ")";
    bar.appendChild(segment);
  });
  cell.appendChild(bar);
  cell.appendChild(element("span", "timeline-text",
    stages.map((seen) => seen.stage + " " + seconds(seen.at_unix_ms - start)).join(" · ") +
    (dhcpSeen ? "" : " (DHCP not seen: from the first stage seen)")));
  return cell;
}

function imageFrom(node) {
  const sources = node.sources;
  if (!sources) return "-";
  let text = "servers " + mebibytes(sources.server_bytes);
  if (sources.peer_bytes > 0) {
    text += ", peers " + mebibytes(sources.peer_bytes) + " (" + sources.peers.join(" ") + ")";
  }
  return text;
}

function drawNodes(view) {
  const counts = new Map(STAGES.map((stage) => [stage, 0]));
  const byRack = new Map();
  const byImage = new Map();
  let serverBytes = 0;
  let peerBytes = 0;
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren();
  for (const node of view.nodes) {
    const stage = latestStage(node);
    if (stage) counts.set(stage, counts.get(stage) + 1);
    const rack = node.rack || "(no rack)";
    const inRack = byRack.get(rack) || { nodes: 0, booted: 0 };
    inRack.nodes += 1;
    if (stage === "booted") inRack.booted += 1;
    byRack.set(rack, inRack);
    if (node.image) {
      const image = byImage.get(node.image) ||
        { nodes: 0, booting: 0, holding: 0, booted: 0, serverBytes: 0, peerBytes: 0 };
      image.nodes += 1;
      const reached = STAGES.indexOf(stage);
      if (stage === "booted") image.booted += 1;
      else if (reached >= STAGES.indexOf("image")) image.holding += 1;
      else image.booting += 1;
      if (node.sources) {
        image.serverBytes += node.sources.server_bytes;
        image.peerBytes += node.sources.peer_bytes;
      }
      byImage.set(node.image, image);
    }
    if (node.sources) {
      serverBytes += node.sources.server_bytes;
      peerBytes += node.sources.peer_bytes;
    }
    const row = element("tr");
    row.dataset.mac = node.mac;
    row.appendChild(element("td", "mac", node.mac));
    row.appendChild(element("td", null, node.hostname || "-"));
    row.appendChild(element("td", "address", node.address || "-"));
    row.appendChild(element("td", "rack", node.rack || "-"));
    row.appendChild(element("td", "image", node.image || "-"));
    row.appendChild(element("td", "stage", stage || "-"));
    row.appendChild(drawTimeline(node));
    row.appendChild(element("td", "sources", imageFrom(node)));
    body.appendChild(row);
  }
  document.getElementById("nodes-empty").hidden = view.nodes.length > 0;
  const stages = document.getElementById("stages");
  stages.replaceChildren();
  for (const stage of STAGES) {
    const box = element("div", "stage");
    box.dataset.stage = stage;
    box.appendChild(element("b", null, String(counts.get(stage))));
    box.appendChild(document.createTextNode(stage));
    stages.appendChild(box);
  }
  drawImages(byImage);
  document.getElementById("nodes-by-rack").textContent = byRack.size === 0 ? "" :
    "nodes by rack: " + [...byRack.entries()].sort()
      .map(([rack, seen]) => rack + " " + seen.nodes + " (" + seen.booted + " booted)")
      .join(", ");
  const total = serverBytes + peerBytes;
  document.getElementById("image-sources").textContent = total === 0
    ? "no image bytes reported yet"
    : "image bytes: " + mebibytes(serverBytes) + " from servers, " + mebibytes(peerBytes) +
      " from peers (" + Math.round(100 * peerBytes / total) + " % from peers)";
  const missing = view.servers.filter((server) => server.error);
  document.getElementById("servers-missing").textContent = missing.length === 0 ? "" :
    "not answering: " + missing.map((server) => server.server + " (" + server.error + ")").join(", ");
}

// Each image's distribution: of the nodes whose boot script named it, how many are still on
// their way to it, hold it (verified), and run it; and how much of it came from peers.
function drawImages(byImage) {
  const body = document.querySelector("#images tbody");
  body.replaceChildren();
  for (const [name, image] of [...byImage.entries()].sort()) {
    const row = element("tr");
    row.dataset.image = name;
    row.appendChild(element("td", "name", name));
    row.appendChild(element("td", "nodes", String(image.nodes)));
    row.appendChild(element("td", "booting", String(image.booting)));
    row.appendChild(element("td", "holding", String(image.holding)));
    row.appendChild(element("td", "booted", String(image.booted)));
    const done = element("td", "progress");
    const bar = element("progress");
    bar.max = image.nodes;
    bar.value = image.holding + image.booted;
    done.appendChild(bar);
    done.appendChild(document.createTextNode(
      " " + Math.round(100 * (image.holding + image.booted) / image.nodes) + " %"));
    row.appendChild(done);
    const total = image.serverBytes + image.peerBytes;
    row.appendChild(element("td", "peers",
      total === 0 ? "-" : Math.round(100 * image.peerBytes / total) + " %"));
    body.appendChild(row);
  }
  document.getElementById("images-empty").hidden = byImage.size > 0;
}

// The cluster's catalog: what each group boots, and whether this server has caught up.
function drawCatalog(view) {
  const line = document.getElementById("catalog");
  const catalog = view.catalog;
  if (!catalog || catalog.promotions.length === 0) {
    line.textContent = "";
    return;
  }
  const promoted = catalog.promotions
    .map((promotion) => promotion.group + " \u2192 " + promotion.image)
    .join(", ");
  const here = catalog.groups_behind_here === 0
    ? "this server boots them all"
    : "this server is still fetching for " + catalog.groups_behind_here + " group(s)";
  line.textContent = "the cluster promoted: " + promoted + "; " + here;
  line.className = catalog.groups_behind_here === 0 ? "muted" : "warning";
}

async function fetchJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

async function refresh() {
  try {
    const [cluster, nodes] = await Promise.all([
      fetchJson("/api/v1/cluster"),
      fetchJson("/api/v1/nodes"),
    ]);
    drawCluster(cluster);
    drawCatalog(cluster);
    drawNodes(nodes);
    document.getElementById("updated").textContent =
      "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    const health = document.getElementById("health");
    health.textContent = "no answer: " + error.message;
    health.className = "badge bad";
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
