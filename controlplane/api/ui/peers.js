// Finding another agent: for the stale banner's link, and to move the page when its own
// agent is gone.
//
// The page never reads another agent's data (its CSP and the API's CORS would not
// allow it): it only asks the configured agents' `/readyz`, which is open, carries no
// secret, and answers CORS requests from the agents' own origins. It then links or
// navigates to the chosen agent's `/ui/`, so everything after that is same-origin there.

const TIMEOUT_MS = 2500;

/**
 * `scheme://host:port` of each member of `/v1/cluster` other than `self`: every agent
 * serves the scheme this page came over (HTTPS when the cluster has TLS on).
 */
export function peerOrigins(cluster, self) {
  const out = [];
  for (const member of (cluster && cluster.members) || []) {
    if (!member.http || member.id === self) continue;
    out.push({ id: member.id, origin: `${window.location.protocol}//${member.http}` });
  }
  return out;
}

async function readyz(origin) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
  try {
    const response = await fetch(`${origin}/readyz`, { mode: "cors", cache: "no-store", signal: controller.signal });
    const body = await response.json();
    return { alive: true, ready: Boolean(body.ready), revision: body.revision ?? -1 };
  } catch {
    return { alive: false, ready: false, revision: -1 };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * The best other agent: one with quorum (the highest revision), else one that answers
 * at all (`needReady` false), else null.
 */
export async function findPeer(peers, needReady) {
  const answers = await Promise.all(peers.map(async (p) => ({ ...p, ...(await readyz(p.origin)) })));
  const ready = answers.filter((a) => a.ready).sort((a, b) => b.revision - a.revision);
  if (ready.length) return ready[0];
  if (needReady) return null;
  return answers.find((a) => a.alive) || null;
}
