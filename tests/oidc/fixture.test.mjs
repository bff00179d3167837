// node --test: the fixture itself works on this machine, without berth: provider.mjs
// starts and issues workload tokens, and Debian's Chromium, through playwright-core, logs
// a user in on the provider's form (the code comes back to a callback server here) and
// takes a screenshot png.mjs accepts. Whatever starts here is stopped here.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import http from 'node:http';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';
import { checkScreenshot } from './png.mjs';

const provider = spawn(process.execPath, [new URL('./provider.mjs', import.meta.url).pathname], {
  stdio: ['ignore', 'pipe', 'ignore'],
});
const [line] = await once(createInterface({ input: provider.stdout }), 'line');
const { issuer, pid } = JSON.parse(line);
after(async () => {
  provider.kill('SIGTERM');
  if (provider.exitCode === null) await once(provider, 'exit');
});

const claims = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url'));
const basic = (id, secret) => `Basic ${Buffer.from(`${id}:${secret}`).toString('base64')}`;
const form = { 'content-type': 'application/x-www-form-urlencoded' };

test('provider.mjs prints its issuer and issues workload tokens', async () => {
  assert.equal(pid, provider.pid);
  assert.match(issuer, /^http:\/\/127\.0\.0\.1:\d+$/);
  const res = await fetch(`${issuer}/token`, {
    method: 'POST',
    headers: { ...form, authorization: basic('ci-job', 'ci-job-secret') },
    body: new URLSearchParams({ grant_type: 'client_credentials', resource: 'urn:other' }),
  });
  assert.equal(res.status, 200);
  const c = claims((await res.json()).access_token);
  assert.deepEqual([c.iss, c.sub, c.aud, c.groups], [issuer, 'ci-job', 'urn:other', ['ci']]);
});

test('Chromium logs alice in on the provider form', async () => {
  const cb = http.createServer();
  cb.listen(0, '127.0.0.1');
  await once(cb, 'listening');
  const redirect = `http://127.0.0.1:${cb.address().port}/login/callback`;
  const gotCode = new Promise((resolve) => cb.on('request', (req, res) => {
    resolve(new URL(req.url, redirect).searchParams);
    res.writeHead(200, { 'content-type': 'text/html' }).end('<h1>back</h1>');
  }));
  const verifier = crypto.randomBytes(32).toString('base64url');
  const auth = new URL(`${issuer}/auth`);
  auth.search = new URLSearchParams({
    client_id: 'berth', response_type: 'code', redirect_uri: redirect, scope: 'openid profile groups',
    state: 's1', nonce: 'n1', code_challenge_method: 'S256',
    code_challenge: crypto.createHash('sha256').update(verifier).digest('base64url'),
  });
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-background-networking', '--no-proxy-server'],
  });
  try {
    const page = await browser.newPage();
    await page.goto(auth.href);
    await page.fill('input[name=login]', 'alice');
    const box = await page.locator('input[name=login]').boundingBox();
    checkScreenshot(await page.screenshot(), [{ selector: 'input[name=login]', box }], { what: 'provider login page' });
    await page.fill('input[name=password]', 'alice-pw');
    await page.click('button[type=submit]');
    const params = await gotCode;
    assert.equal(params.get('state'), 's1');
    const res = await fetch(`${issuer}/token`, {
      method: 'POST',
      headers: { ...form, authorization: basic('berth', 'berth-secret') },
      body: new URLSearchParams({ grant_type: 'authorization_code', code: params.get('code'), redirect_uri: redirect, code_verifier: verifier }),
    });
    assert.equal(res.status, 200);
    const id = claims((await res.json()).id_token);
    assert.deepEqual([id.sub, id.preferred_username, id.groups, id.aud], ['u-1001', 'alice', ['ci', 'admins'], 'berth']);
  } finally {
    await browser.close();
    cb.closeAllConnections();
    cb.close();
  }
});
