// A real OpenID provider (oidc-provider 8) for berth's tests: plain http on loopback.
//
//   node provider.mjs [CONFIG.json]
//
// Listens on 127.0.0.1:0 and, once listening, prints one JSON line on stdout:
// {"port":N,"issuer":"http://127.0.0.1:N","pid":P}. The issuer has no trailing slash.
// Everything else (oidc-provider's warnings, one line per request) goes to stderr.
// SIGTERM or SIGINT: closes every connection and exits 0.
//
// CONFIG (every key optional; the defaults are in DEFAULTS below):
//   alg             "RS256" (default) or "ES256": the key type generated at start, used for
//                   ID tokens, workload access tokens and /_test/mint
//   login_client    {client_id, client_secret}: the client berth logs users in as. Code flow,
//                   client_secret_basic, PKCE S256 (required unless pkce_required is false),
//                   redirect URI http://127.0.0.1/login/callback with application_type
//                   native, so that the callback on any port of 127.0.0.1 matches (RFC 8252 7.3)
//   pkce_required   true (default)
//   workload_clients [{client_id, client_secret, groups}]: client_credentials clients. Their
//                   access tokens are JWTs (typ at+jwt) with aud = the `resource` parameter
//                   (default urn:berth), sub = client_id, and a `groups` claim
//   users           [{sub, username, password, groups, name?, email?}]: the login form checks
//                   username + password; the ID token has sub, preferred_username (username),
//                   name, email, email_verified and groups
//
// Test-only routes, answered before oidc-provider sees the request:
//   GET  /_test/mint?sub=&aud=&groups=a,b&exp_in=SECONDS&iss=&username=
//        a JWT signed with the provider's key (the kid in /jwks). Defaults: sub ci-job,
//        aud urn:berth, iss the issuer, exp_in 300 (negative: already expired); no groups
//        claim unless `groups` is given (empty: []), no preferred_username unless `username`
//   POST /_test/groups   form body user=NAME&groups=a,b
//        replaces the groups of a user (by username or sub) or of a workload client (by
//        client_id) from now on: later logins and later tokens carry the new groups.
//        Answers {"user":..,"groups":[..]}, or 404 for an unknown name
import fs from 'node:fs';
import http from 'node:http';
import { once } from 'node:events';
import Provider from 'oidc-provider';
import { generateKeyPair, exportJWK, SignJWT } from 'jose';

const DEFAULTS = {
  alg: 'RS256',
  login_client: { client_id: 'berth', client_secret: 'berth-secret' },
  pkce_required: true,
  workload_clients: [{ client_id: 'ci-job', client_secret: 'ci-job-secret', groups: ['ci'] }],
  users: [
    { sub: 'u-1001', username: 'alice', password: 'alice-pw', groups: ['ci', 'admins'] },
    { sub: 'u-1002', username: 'bob', password: 'bob-pw', groups: ['ci'] },
  ],
};
const DEFAULT_RESOURCE = 'urn:berth';
const KID = 'test-key-1';

const config = { ...DEFAULTS, ...(process.argv[2] ? JSON.parse(fs.readFileSync(process.argv[2], 'utf8')) : {}) };
const ALG = config.alg;
if (!['RS256', 'ES256'].includes(ALG)) throw new Error(`provider.mjs: alg must be RS256 or ES256, not ${ALG}`);
const users = config.users.map((u) => ({ ...u, groups: [...u.groups] }));
const workloads = config.workload_clients.map((c) => ({ ...c, groups: [...(c.groups ?? [])] }));
const userByName = (name) => users.find((u) => u.username === name);

// Our own key, not oidc-provider's dev keystore, so that /_test/mint signs with it too.
const { privateKey } = await generateKeyPair(ALG, { extractable: true });
const jwk = { ...(await exportJWK(privateKey)), kid: KID, alg: ALG, use: 'sig' };

// Listen first, so that the issuer has the real port.
const server = http.createServer();
server.listen(0, '127.0.0.1');
await once(server, 'listening');
const port = server.address().port;
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  jwks: { keys: [jwk] },
  cookies: { keys: ['berth-test-cookie-key'] },
  clients: [
    {
      client_id: config.login_client.client_id,
      client_secret: config.login_client.client_secret,
      application_type: 'native',
      redirect_uris: ['http://127.0.0.1/login/callback'],
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      id_token_signed_response_alg: ALG,
    },
    ...workloads.map((c) => ({
      client_id: c.client_id,
      client_secret: c.client_secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
      // Every client needs an alg the keystore can sign, even one that gets no ID token.
      id_token_signed_response_alg: ALG,
    })),
  ],
  async findAccount(_ctx, sub) {
    const u = users.find((x) => x.sub === sub);
    if (!u) return undefined;
    return {
      accountId: u.sub,
      async claims() {
        return {
          sub: u.sub,
          preferred_username: u.username,
          name: u.name ?? u.username,
          email: u.email ?? `${u.username}@example.test`,
          email_verified: true,
          groups: [...u.groups],
        };
      },
    };
  },
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  scopes: ['openid', 'profile', 'email', 'groups'],
  // With the default (true) and response_type=code the scopes' claims would go to /userinfo
  // only, and the ID token would carry just sub.
  conformIdTokenClaims: false,
  pkce: { required: () => config.pkce_required, methods: ['S256'] },
  features: {
    devInteractions: { enabled: false }, // the login form below replaces them
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (_ctx, _client, oneOf) => oneOf ?? DEFAULT_RESOURCE,
      useGrantedResource: async () => false,
      getResourceServerInfo: async (_ctx, resource) => ({
        scope: 'pull push',
        audience: resource,
        accessTokenTTL: 300,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: ALG } },
      }),
    },
  },
  extraTokenClaims: async (_ctx, token) => {
    if (token.kind !== 'ClientCredentials') return undefined;
    const c = workloads.find((x) => x.client_id === token.clientId);
    return c ? { groups: [...c.groups] } : undefined;
  },
  ttl: { ClientCredentials: 300, AccessToken: 300, IdToken: 300, AuthorizationCode: 60, Session: 3600, Interaction: 600, Grant: 3600 },
});
provider.on('server_error', (_ctx, err) => console.error('provider.mjs: server_error', err));
const oidc = provider.callback();

const esc = (v) => String(v).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const send = (res, status, type, body) =>
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' }).end(body);
const loginPage = (uid, error) => `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Test provider: sign in</title>
<style>body{font-family:sans-serif;margin:2em}label{display:block;margin:.5em 0}.error{color:#b00}</style></head>
<body><h1>Test provider: sign in</h1>
${error ? `<p class="error">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login">
<label>Login <input name="login" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form></body></html>`;

async function readForm(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return new URLSearchParams(body);
}

// The interaction pages: a login form that checks the password, and consent granted
// without a page (berth is a first-party client).
async function interaction(req, res, url) {
  const details = await provider.interactionDetails(req, res);
  if (req.method === 'POST' && url.pathname.endsWith('/login')) {
    const form = await readForm(req);
    const u = userByName(form.get('login'));
    if (!u || u.password !== form.get('password')) {
      return send(res, 401, 'text/html; charset=utf-8', loginPage(details.uid, 'Invalid login or password'));
    }
    return provider.interactionFinished(req, res, { login: { accountId: u.sub } }, { mergeWithLastSubmission: false });
  }
  if (details.prompt.name === 'login') return send(res, 200, 'text/html; charset=utf-8', loginPage(details.uid));
  const { prompt: { details: missing }, params, session, grantId } = details;
  const grant = grantId
    ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  return provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } }, { mergeWithLastSubmission: true });
}

async function mint(res, q) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: q.get('sub') ?? 'ci-job' };
  if (q.has('groups')) claims.groups = q.get('groups').split(',').filter(Boolean);
  if (q.has('username')) claims.preferred_username = q.get('username');
  const jwt = await new SignJWT(claims)
    .setProtectedHeader({ alg: ALG, kid: KID, typ: 'at+jwt' })
    .setIssuer(q.get('iss') ?? issuer)
    .setAudience(q.get('aud') ?? DEFAULT_RESOURCE)
    .setIssuedAt(now)
    .setExpirationTime(now + Number(q.get('exp_in') ?? 300))
    .sign(privateKey);
  send(res, 200, 'text/plain', jwt);
}

async function setGroups(req, res) {
  const form = await readForm(req);
  const name = form.get('user') ?? '';
  const groups = (form.get('groups') ?? '').split(',').filter(Boolean);
  const who = users.find((u) => u.username === name || u.sub === name) ?? workloads.find((c) => c.client_id === name);
  if (!who) return send(res, 404, 'application/json', JSON.stringify({ error: `no user or client ${name}` }));
  who.groups = groups;
  console.error(`provider.mjs: groups of ${name} are now [${groups.join(',')}]`);
  send(res, 200, 'application/json', JSON.stringify({ user: name, groups }));
}

server.on('request', (req, res) => {
  const url = new URL(req.url, issuer);
  res.on('finish', () => console.error(`provider.mjs: ${req.method} ${url.pathname} ${res.statusCode}`));
  let handled;
  if (url.pathname.startsWith('/interaction/')) handled = interaction(req, res, url);
  else if (url.pathname === '/_test/mint' && req.method === 'GET') handled = mint(res, url.searchParams);
  else if (url.pathname === '/_test/groups' && req.method === 'POST') handled = setGroups(req, res);
  else return oidc(req, res);
  handled.catch((err) => {
    console.error(`provider.mjs: ${url.pathname}:`, err);
    if (!res.headersSent) send(res, 400, 'text/plain', `provider.mjs: ${err.message}\n`);
  });
});

console.log(JSON.stringify({ port, issuer, pid: process.pid }));
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections(); // keep-alive connections (a browser's) would hold close()
  });
}
