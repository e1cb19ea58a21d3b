// Reference: Node.js with the `ws` package (installed by `tidings bench --setup`).
// Speaks the Phoenix subset of ceiling_server.py: join reply, heartbeat, broadcast fan-out
// (the outgoing message is encoded once per wire format and the same Buffer sent to everyone).
//
//   node benchmarks/node/ws_server.mjs --port 4103
import { WebSocketServer } from 'ws';

const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : dflt;
};
const host = arg('--host', '127.0.0.1');
const port = parseInt(arg('--port', '4103'), 10);
const channels = new Map(); // topic -> { v1: Set, v2: Set }

const wss = new WebSocketServer({ host, port, perMessageDeflate: false, clientTracking: false, backlog: 4096 });

wss.on('connection', (ws, req) => {
  const v2 = req.url.includes('vsn=2');
  const topics = [];
  const reply = (joinRef, ref, topic, response) => {
    const body = { status: 'ok', response };
    ws.send(JSON.stringify(v2 ? [joinRef, ref, topic, 'phx_reply', body]
      : { topic, event: 'phx_reply', payload: body, ref }));
  };
  ws.on('message', (data) => {
    let msg;
    try { msg = JSON.parse(data); } catch { return; }
    let joinRef, ref, topic, event, payload;
    if (v2) [joinRef, ref, topic, event, payload] = msg;
    else ({ join_ref: joinRef, ref, topic, event, payload } = msg);
    if (event === 'heartbeat') {
      reply(null, ref, topic, {});
    } else if (event === 'phx_join') {
      let ch = channels.get(topic);
      if (!ch) { ch = { v1: new Set(), v2: new Set() }; channels.set(topic, ch); }
      (v2 ? ch.v2 : ch.v1).add(ws);
      topics.push(topic);
      reply(joinRef, ref, topic, { postgres_changes: [] });
    } else if (event === 'broadcast') {
      const ch = channels.get(topic);
      if (!ch) return;
      const body = { type: 'broadcast', event: payload.event, payload: payload.payload };
      if (ch.v2.size) {
        const f = Buffer.from(JSON.stringify([null, null, topic, 'broadcast', body]));
        for (const c of ch.v2) if (c !== ws) c.send(f, { binary: false });
      }
      if (ch.v1.size) {
        const f = Buffer.from(JSON.stringify({ topic, event: 'broadcast', payload: body, ref: null }));
        for (const c of ch.v1) if (c !== ws) c.send(f, { binary: false });
      }
    }
  });
  ws.on('close', () => {
    for (const t of topics) {
      const ch = channels.get(t);
      if (ch) { ch.v1.delete(ws); ch.v2.delete(ws); }
    }
  });
  ws.on('error', () => {});
});

const stop = () => { wss.close(); process.exit(0); };
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
