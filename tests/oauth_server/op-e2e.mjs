// Loopback-only OAuth 2.0 / OpenID Connect provider for the end-to-end tests (oidc-provider 9.x).
// TEST USE ONLY: devInteractions accept any login/password, keys are generated per process, the
// control routes (/__faults, /__stats) are unauthenticated. It binds to 127.0.0.1 only.
//
// Environment (all optional):
//   OP_PORT             port to bind; 0 (default) = pick a free one (the ready line prints it)
//   OP_ISSUER           issuer; default http://127.0.0.1:<port>; "{port}" is replaced by the port
//                       (e.g. http://localhost:{port} for a mix-up test). A path is not supported.
//   OP_REDIRECT_URIS    comma-separated redirect URIs registered for both clients
//                       (OP_REDIRECT_URI is accepted as a fallback); default
//                       http://127.0.0.1:8000/oauth2/callback
//   OP_ROTATE_REFRESH   "0" = never rotate refresh tokens; anything else (default) = rotate on every
//                       refresh; reuse of a rotated RT => invalid_grant and the whole grant revoked
//   OP_AT_TTL           access token lifetime in seconds (default 60)
//   OP_RT_TTL           refresh token lifetime in seconds (default 86400)
//   OP_ALWAYS_RT        "1" = issue a refresh token even without the offline_access scope
//   OP_EXIT_ON_STDIN_EOF "1" = exit when stdin closes (the harness sets it: no orphans)
//
// Clients (PKCE S256 required for both):
//   svc-basic  secret "p+q r%s:t"      client_secret_basic (special characters on purpose)
//   svc-post   secret "post-secret"    client_secret_post
//
// Test control routes:
//   POST /__faults {"status":503,"count":1}         fail before processing (Retry-After: 1)
//   POST /__faults {"delayMs":3000,"count":1}       slow before processing
//   POST /__faults {"delayAfterMs":3000,"count":1}  processed (RT rotated), response late
//        optional: "endpoint": "token" (default) | "revocation" | "api" (/api/whoami and /me),
//                  "retryAfter": "<header value>", "error": "<error code>", "count" (default 1)
//   POST /__faults {"reset":true}                   clear all faults
//   GET  /__faults                                  current faults
//   GET  /__stats                                   {token_requests, by_grant, revocations,
//                                                    api_requests, log: [...]}; one log entry per
//                                                    token or revocation call: {endpoint, grant_type,
//                                                    client_id, auth_method, at, status, error,
//                                                    token_type_hint, fault} (no secrets, no tokens)
//   POST /__stats/reset                             zero the counters and the log
//   GET  /api/whoami                                protected "API": {sub, scope, client_id, exp}
//                                                   for a valid `Authorization: Bearer` access token,
//                                                   else 401 WWW-Authenticate: Bearer error="invalid_token"
//
// Prints exactly one line on stdout when listening:  op ready http://127.0.0.1:<port>
// (followed by " issuer=<issuer>" when the issuer differs from that base URL).
import http from 'node:http';
import querystring from 'node:querystring';

import Provider from 'oidc-provider';

const env = process.env;
const REQUESTED_PORT = Number(env.OP_PORT ?? 0);
const REDIRECTS = (env.OP_REDIRECT_URIS ?? env.OP_REDIRECT_URI ?? 'http://127.0.0.1:8000/oauth2/callback')
  .split(',').map((s) => s.trim()).filter(Boolean);
const ROTATE = env.OP_ROTATE_REFRESH !== '0';
const ALWAYS_RT = env.OP_ALWAYS_RT === '1';
const AT_TTL = Number(env.OP_AT_TTL ?? 60);
const RT_TTL = Number(env.OP_RT_TTL ?? 24 * 3600);

export const CLIENTS = [
  {
    client_id: 'svc-basic', client_secret: 'p+q r%s:t',
    redirect_uris: REDIRECTS, grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'], token_endpoint_auth_method: 'client_secret_basic',
  },
  {
    client_id: 'svc-post', client_secret: 'post-secret',
    redirect_uris: REDIRECTS, grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'], token_endpoint_auth_method: 'client_secret_post',
  },
];

const sleep = (ms) => new Promise((r) => { setTimeout(r, ms); });

async function readRaw(req) {
  let raw = '';
  for await (const c of req) raw += c;
  return raw;
}

// ---- fault injection ---------------------------------------------------------------------------
const ENDPOINTS = new Set(['token', 'revocation', 'api']);
const faults = new Map(); // endpoint -> {status?, delayMs?, delayAfterMs?, count, retryAfter?, error?}

// ---- extra token-response fields (POST /__token-extra {"instance_url": ...}; {} clears) --------
// Added to every successful token response, as Salesforce adds instance_url.
let tokenExtra = {};

function endpointOf(ctx) {
  if (ctx.method === 'POST' && ctx.path === '/token') return 'token';
  if (ctx.method === 'POST' && ctx.path === '/token/revocation') return 'revocation';
  if (ctx.path === '/api/whoami' || ctx.path === '/me') return 'api';
  return null;
}

function takeFault(endpoint) {
  const f = endpoint ? faults.get(endpoint) : undefined;
  if (!f || f.count <= 0) return null;
  f.count -= 1;
  return { ...f };
}

// ---- stats (never secrets or tokens) -----------------------------------------------------------
let stats;
function resetStats() {
  stats = { token_requests: 0, by_grant: {}, revocations: 0, api_requests: 0, log: [] };
}
resetStats();

// client_id only, from the form body or the id half of HTTP Basic; the secret is never decoded.
function clientIdOf(ctx, body) {
  if (body && typeof body.client_id === 'string') return body.client_id;
  const auth = ctx.get('authorization');
  if (/^basic /i.test(auth)) {
    try {
      const decoded = Buffer.from(auth.slice(6).trim(), 'base64').toString('utf8');
      const id = decoded.split(':', 1)[0];
      return decodeURIComponent(id.replace(/\+/g, ' '));
    } catch {
      return null;
    }
  }
  return null;
}

function authMethodOf(ctx, body) {
  if (/^basic /i.test(ctx.get('authorization'))) return 'client_secret_basic';
  if (body && body.client_secret !== undefined) return 'client_secret_post';
  return 'none';
}

function errorOf(ctx) {
  const b = ctx.body;
  if (b && typeof b === 'object' && !Buffer.isBuffer(b) && typeof b.error === 'string') return b.error;
  return null;
}

function record(endpoint, ctx, body, fault) {
  const entry = {
    endpoint,
    grant_type: body && typeof body.grant_type === 'string' ? body.grant_type : null,
    client_id: clientIdOf(ctx, body),
    auth_method: authMethodOf(ctx, body),
    at: new Date().toISOString(),
    status: ctx.status,
    error: errorOf(ctx),
    token_type_hint: endpoint === 'revocation' && body && typeof body.token_type_hint === 'string' ? body.token_type_hint : null,
    fault: fault ? Object.keys(fault).filter((k) => ['status', 'delayMs', 'delayAfterMs'].includes(k))[0] ?? null : null,
  };
  if (endpoint === 'token') {
    stats.token_requests += 1;
    const g = entry.grant_type ?? '(none)';
    stats.by_grant[g] = (stats.by_grant[g] ?? 0) + 1;
  } else if (endpoint === 'revocation') {
    stats.revocations += 1;
  } else {
    stats.api_requests += 1;
  }
  if (endpoint !== 'api') {
    stats.log.push(entry);
  }
}

function json(ctx, status, body) {
  ctx.status = status;
  ctx.set('Cache-Control', 'no-store');
  ctx.body = body;
}

// ---- server ------------------------------------------------------------------------------------
const server = http.createServer();
server.listen(REQUESTED_PORT, '127.0.0.1', () => {
  const { port } = server.address();
  const base = `http://127.0.0.1:${port}`;
  const issuer = (env.OP_ISSUER ?? base).replaceAll('{port}', String(port));

  const provider = new Provider(issuer, {
    clients: CLIENTS,
    pkce: { required: () => true }, // S256 for every client (9.x supports S256 only)
    scopes: ['openid', 'offline_access', 'api:read', 'api:write'],
    features: {
      devInteractions: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: true },
    },
    issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed('refresh_token')
      && (ALWAYS_RT || code.scopes.has('offline_access')),
    rotateRefreshToken: () => ROTATE,
    ttl: {
      AccessToken: AT_TTL,
      AuthorizationCode: 60,
      RefreshToken: RT_TTL,
      Interaction: 600,
      Session: 3600,
      Grant: RT_TTL,
    },
    cookies: { keys: ['e2e-only-cookie-key'] },
  });

  // Control routes, fault injection, stats and the protected API (mounted before the provider).
  provider.use(async (ctx, next) => {
    if (ctx.path === '/__faults') {
      if (ctx.method === 'GET') { json(ctx, 200, Object.fromEntries(faults)); return; }
      if (ctx.method !== 'POST') { ctx.status = 405; return; }
      let spec;
      try {
        const raw = await readRaw(ctx.req);
        spec = raw ? JSON.parse(raw) : { reset: true };
      } catch {
        json(ctx, 400, { error: 'bad fault spec' }); return;
      }
      if (spec.reset) { faults.clear(); ctx.status = 204; return; }
      const endpoint = spec.endpoint ?? 'token';
      if (!ENDPOINTS.has(endpoint)) { json(ctx, 400, { error: `unknown endpoint ${endpoint}` }); return; }
      const f = { count: Number(spec.count ?? 1) };
      for (const k of ['status', 'delayMs', 'delayAfterMs']) if (spec[k] !== undefined) f[k] = Number(spec[k]);
      if (spec.retryAfter !== undefined) f.retryAfter = String(spec.retryAfter);
      if (spec.error !== undefined) f.error = String(spec.error);
      faults.set(endpoint, f);
      ctx.status = 204;
      return;
    }
    if (ctx.path === '/__token-extra' && ctx.method === 'POST') {
      try {
        const raw = await readRaw(ctx.req);
        tokenExtra = raw ? JSON.parse(raw) : {};
      } catch {
        json(ctx, 400, { error: 'bad token-extra spec' }); return;
      }
      ctx.status = 204;
      return;
    }
    if (ctx.path === '/__stats' && ctx.method === 'GET') { json(ctx, 200, stats); return; }
    if (ctx.path === '/__stats/reset' && ctx.method === 'POST') { resetStats(); ctx.status = 204; return; }

    const endpoint = endpointOf(ctx);
    if (!endpoint) { await next(); return; }

    const f = takeFault(endpoint);
    if (f?.delayMs) await sleep(f.delayMs);
    if (f?.status) {
      // Answer without processing. Read the body ourselves (only here: the provider parses it
      // otherwise) so the log can name grant type and client.
      let body = null;
      if (ctx.method === 'POST' && ctx.is('application/x-www-form-urlencoded')) {
        body = querystring.parse(await readRaw(ctx.req));
      }
      ctx.status = f.status;
      if (f.status === 503 || f.status === 429 || f.retryAfter !== undefined) ctx.set('Retry-After', f.retryAfter ?? '1');
      ctx.set('Cache-Control', 'no-store');
      ctx.body = { error: f.error ?? (f.status >= 500 || f.status === 429 ? 'temporarily_unavailable' : 'invalid_request') };
      record(endpoint, ctx, body, f);
      return;
    }

    if (ctx.path === '/api/whoami') {
      await whoami(ctx, provider);
    } else {
      await next();
      const b = ctx.body;
      if (endpoint === 'token' && b && typeof b === 'object' && !Buffer.isBuffer(b) && b.access_token) {
        ctx.body = { ...b, ...tokenExtra };
      }
    }
    record(endpoint, ctx, ctx.oidc?.body ?? null, f);
    if (f?.delayAfterMs) await sleep(f.delayAfterMs);
  });

  const handler = provider.callback();
  server.on('request', handler);
  const extra = issuer === base ? '' : ` issuer=${issuer}`;
  process.stdout.write(`op ready ${base}${extra}\n`);
});

// GET /api/whoami: a resource server that trusts the provider's own access tokens.
async function whoami(ctx, provider) {
  const deny = (status, error, description) => {
    ctx.set('WWW-Authenticate', `Bearer realm="op-e2e", error="${error}", error_description="${description}"`);
    json(ctx, status, { error, error_description: description });
  };
  if (ctx.method !== 'GET') { ctx.status = 405; return; }
  if (ctx.query.access_token !== undefined) {
    deny(400, 'invalid_request', 'bearer tokens are accepted in the Authorization header only');
    return;
  }
  const m = /^Bearer +([A-Za-z0-9\-._~+/]+=*)$/i.exec(ctx.get('authorization'));
  if (!m) { deny(401, 'invalid_token', 'no bearer token'); return; }
  const at = await provider.AccessToken.find(m[1]);
  if (!at || at.isExpired) { deny(401, 'invalid_token', 'invalid or expired access token'); return; }
  const grant = at.grantId ? await provider.Grant.find(at.grantId) : undefined;
  if (!grant) { deny(401, 'invalid_token', 'grant revoked'); return; }
  json(ctx, 200, {
    sub: at.accountId, scope: at.scope ?? '', client_id: at.clientId, exp: at.exp,
  });
}

// Orphan guard: with OP_EXIT_ON_STDIN_EOF=1 the server exits when its stdin closes, i.e. when the
// test process that holds the other end of the pipe dies without terminating us.
if (env.OP_EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}

process.on('SIGTERM', () => { server.close(); process.exit(0); });
process.on('SIGINT', () => { server.close(); process.exit(0); });
