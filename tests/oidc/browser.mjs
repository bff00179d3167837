// Drives berth's web pages in headless Chromium (Debian's /usr/bin/chromium, through
// playwright-core) for berth's end-to-end tests.
//
//   node tests/oidc/browser.mjs COMMAND --berth URL [OPTIONS]
//
// Prints one JSON line on stdout and exits 0; on failure prints {"error":..} on stdout, a
// message on stderr (what failed, the page's URL and text, the pages visited) and exits 1.
// Every page a command visits is screenshotted into --out and checked (png.mjs): not blank,
// and each element the command relies on visible, inside the image, and drawn.
//
// Commands (the element ids are those of notes/issue12-design.md):
//   login             open /login, click a.oidc-login#login-PROVIDER, fill the provider's form,
//                     and land back on berth logged in (#whoami). Always a fresh browser
//                     profile; with --state, saves its cookies there.
//                     -> {user, url, screenshots}
//   login-create-key  login, then what create-key does.  -> {user, key, key_id, groups, row, ...}
//   create-key        (--state) on /ui/keys submit form#create-key; read code#new-key,
//                     #new-key-user, #groups and the key's row in table#keys
//   status            (--state, else anonymous) /ui: every figure's text and data-value
//                     -> {whoami, figures:{id:{text,value}}, upstreams, cache_repos, private_repos}
//   keys              (--state) /ui/keys: table#keys rows  -> {whoami, groups, keys:[..]}
//   revoke            (--state, --key-id ID) submit the row's form.revoke -> {revoked, keys}
//
// Options:
//   --berth URL          berth's base URL, e.g. http://127.0.0.1:PORT (required)
//   --out DIR            where screenshots go (default: a new directory in $TMPDIR)
//   --state FILE         cookies: read by create-key/status/keys/revoke, written by login*
//   --provider NAME      the OIDC provider's name in berth's configuration (login*)
//   --user U --password P   the provider's login form (login*)
//   --expect-refused     login*: the login must be refused, by the provider (its form shows
//                        p.error) or by berth (p.error, no #whoami)
//                        -> {refused:true, by:"provider"|"berth", error, url, screenshots}
//   --key-name NAME      create-key: the key's name (default browser-test)
//   --expires-in-days N  create-key: fill input[name=expires_in_days] (default: the page's)
//   --timeout MS         per action (default 15000)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { checkScreenshot } from './png.mjs';

const CHROMIUM = '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-background-networking', '--no-proxy-server'];
const STATUS_FIGURES = ['hit-ratio', 'hits', 'misses', 'disk-used', 'disk-budget', 'disk-free', 'fills-in-progress'];
const STATUS_TABLES = {
  upstreams: { table: 'table#upstreams', key: 'data-upstream', cells: ['bytes-served', 'bytes-fetched', 'health', 'last-error', 'stale'] },
  cache_repos: { table: 'table#cache-repos', key: 'data-repo', cells: ['size', 'last-pull'] },
  private_repos: { table: 'table#private-repos', key: 'data-repo', cells: ['tags'] },
};
const KEY_CELLS = ['key-name', 'key-created', 'key-last-used', 'key-expires', 'key-groups'];
const FLAGS = new Set(['expect-refused']);

class Usage extends Error {}

function parseArgs(argv) {
  const [command, ...rest] = argv;
  const opts = {};
  for (let i = 0; i < rest.length; i++) {
    const m = rest[i].match(/^--([a-z-]+)$/);
    if (!m) throw new Usage(`unexpected argument ${rest[i]}`);
    if (FLAGS.has(m[1])) opts[m[1]] = true;
    else if (i + 1 < rest.length) opts[m[1]] = rest[++i];
    else throw new Usage(`--${m[1]} needs a value`);
  }
  return { command, opts };
}

const need = (opts, name) => {
  if (opts[name] === undefined) throw new Usage(`--${name} is required`);
  return opts[name];
};

// --- one browser session ------------------------------------------------------------------

class Session {
  constructor(command, opts) {
    this.command = command;
    this.opts = opts;
    this.berth = new URL(need(opts, 'berth')).origin;
    this.out = opts.out ?? fs.mkdtempSync(path.join(os.tmpdir(), 'berth-browser-'));
    fs.mkdirSync(this.out, { recursive: true });
    this.timeout = Number(opts.timeout ?? 15000);
    this.screenshots = [];
    this.visited = [];
  }

  async open({ withState }) {
    this.browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: this.timeout });
    const state = withState && this.opts.state && fs.existsSync(this.opts.state) ? this.opts.state : undefined;
    this.context = await this.browser.newContext({ storageState: state, viewport: { width: 1280, height: 900 } });
    this.page = await this.context.newPage();
    this.page.setDefaultTimeout(this.timeout);
    this.page.on('framenavigated', (f) => {
      if (f === this.page.mainFrame()) this.visited.push(f.url());
    });
  }

  async close() {
    await this.browser?.close().catch(() => {});
  }

  url(p) {
    return new URL(p, this.berth).href;
  }

  onBerth() {
    return new URL(this.page.url()).origin === this.berth;
  }

  async goto(p) {
    const res = await this.page.goto(this.url(p), { waitUntil: 'load' });
    if (res && res.status() >= 400) throw new Error(`GET ${p}: status ${res.status()}`);
  }

  // Screenshots the whole page into the output folder as NAME and checks it: not blank,
  // and each selector present, visible, inside the image and (if it has text or is a
  // control) drawn. Selectors that match several elements are checked on every one.
  async shoot(name, selectors) {
    await this.page.waitForLoadState('load');
    const file = path.join(this.out, `${this.command}-${String(this.screenshots.length + 1).padStart(2, '0')}-${name}.png`);
    const png = await this.page.screenshot({ path: file, fullPage: true });
    const elements = [];
    for (const selector of selectors) {
      const found = await this.page.$$eval(selector, (els) => els.map((el) => {
        const r = el.getBoundingClientRect();
        const control = /^(INPUT|BUTTON|SELECT|TEXTAREA|FORM|TABLE|TR)$/.test(el.tagName);
        return {
          visible: el.checkVisibility({ checkOpacity: true, checkVisibilityCSS: true }),
          empty: !control && el.innerText.trim() === '',
          box: { x: r.x + window.scrollX, y: r.y + window.scrollY, width: r.width, height: r.height },
        };
      }));
      if (found.length === 0) throw new Error(`${name} page: ${selector} is missing`);
      found.forEach((f, i) => {
        const what = found.length > 1 ? `${selector} [${i}]` : selector;
        if (!f.visible) throw new Error(`${name} page: ${what} is not visible`);
        if (!f.empty) elements.push({ selector: what, box: f.box });
      });
    }
    const stats = checkScreenshot(png, elements, { what: `${name} page (${file})` });
    this.screenshots.push({ page: name, file, url: this.page.url(), ...stats, checked: selectors });
  }

  async text(selector) {
    const el = await this.page.$(selector);
    return el ? (await el.innerText()).trim() : null;
  }

  // {text, value} of the first element matching `selector`, or null.
  async figure(selector) {
    return this.page.$eval(selector, (el) => ({ text: el.innerText.trim(), value: el.getAttribute('data-value') })).catch(() => null);
  }

  // The rows of `table` that carry the attribute `key`, each as {cell: {text, value}}.
  async rows(table, key, cells) {
    return this.page.$$eval(`${table} tr[${key}]`, (trs, [key, cells]) => trs.map((tr) => {
      const row = { [key]: tr.getAttribute(key) };
      for (const c of cells) {
        const td = tr.querySelector(`.${c}`);
        row[c] = td ? { text: td.innerText.trim(), value: td.getAttribute('data-value') } : null;
      }
      return row;
    }), [key, cells]);
  }

  // #groups: the texts of its list items if it has any, else its text split at commas
  // and white space.
  async groups() {
    const items = await this.page.$$eval('#groups li', (lis) => lis.map((li) => li.innerText.trim()));
    if (items.length) return items.filter(Boolean);
    const text = await this.text('#groups');
    return text === null ? null : text.split(/[\s,]+/).filter(Boolean);
  }

  result(fields) {
    return { ...fields, screenshots: this.screenshots };
  }
}

// --- commands -----------------------------------------------------------------------------

async function login(s) {
  const provider = need(s.opts, 'provider');
  const user = need(s.opts, 'user');
  const password = need(s.opts, 'password');
  const link = `a.oidc-login#login-${provider}`;
  await s.goto('/login');
  await s.shoot('berth-login', ['form#password-login', link]);
  await Promise.all([s.page.waitForNavigation({ waitUntil: 'load' }), s.page.click(link)]);
  if (s.onBerth()) {
    const error = await s.text('p.error');
    throw new Error(`${link} did not lead to the provider${error ? `: ${error}` : ''}`);
  }
  await s.page.waitForSelector('input[name=login]');
  await s.shoot('provider-login', ['input[name=login]', 'input[name=password]', 'button[type=submit]']);
  await s.page.fill('input[name=login]', user);
  await s.page.fill('input[name=password]', password);
  // Either the provider redirects back to berth, or its form comes back with p.error.
  const back = s.page.waitForURL((u) => u.origin === s.berth, { waitUntil: 'load' });
  const refusedByProvider = s.page.waitForSelector('p.error');
  back.catch(() => {});
  refusedByProvider.catch(() => {});
  await s.page.click('button[type=submit]');
  await Promise.race([back, refusedByProvider]);
  await s.page.waitForLoadState('load');
  const refused = s.opts['expect-refused'];
  if (!s.onBerth()) {
    const error = await s.text('p.error');
    if (!refused) throw new Error(`the provider refused the login of ${user}: ${error}`);
    await s.shoot('provider-refused', ['p.error']);
    return { done: true, result: s.result({ refused: true, by: 'provider', error, url: s.page.url() }) };
  }
  const whoami = await s.text('#whoami');
  const error = await s.text('p.error');
  if (whoami === null) {
    if (!refused) throw new Error(`back on berth but not logged in (no #whoami)${error ? `: ${error}` : ''}`);
    if (error === null) throw new Error('back on berth, neither logged in (#whoami) nor refused (p.error)');
    await s.shoot('berth-refused', ['p.error']);
    return { done: true, result: s.result({ refused: true, by: 'berth', error, url: s.page.url() }) };
  }
  if (refused) throw new Error(`the login of ${user} was expected to be refused, but berth shows #whoami ${whoami}`);
  await s.shoot('berth-logged-in', ['nav', '#whoami']);
  if (s.opts.state) await s.context.storageState({ path: s.opts.state });
  return { done: false, user: whoami, result: s.result({ user: whoami, url: s.page.url() }) };
}

async function keyRows(s) {
  return s.rows('table#keys', 'data-key-id', KEY_CELLS);
}

async function createKey(s) {
  const name = s.opts['key-name'] ?? 'browser-test';
  await s.goto('/ui/keys');
  await s.shoot('keys', ['nav', '#whoami', 'form#create-key', 'table#keys']);
  await s.page.fill('form#create-key input[name=name]', name);
  if (s.opts['expires-in-days'] !== undefined) {
    await s.page.fill('form#create-key input[name=expires_in_days]', String(s.opts['expires-in-days']));
  }
  await Promise.all([s.page.waitForNavigation({ waitUntil: 'load' }), s.page.click('form#create-key button[type=submit]')]);
  const key = await s.text('code#new-key');
  if (!key) throw new Error(`after creating key ${name}: no code#new-key on ${s.page.url()}${(await s.text('p.error')) ? `: ${await s.text('p.error')}` : ''}`);
  await s.shoot('key-created', ['nav', '#whoami', 'code#new-key', '#new-key-user', 'table#keys']);
  const keys = await keyRows(s);
  const row = keys.filter((r) => r['key-name']?.text === name).pop() ?? null;
  if (!row) throw new Error(`table#keys has no row named ${name}`);
  return s.result({
    user: await s.text('#new-key-user'),
    whoami: await s.text('#whoami'),
    key,
    key_id: row['data-key-id'],
    groups: await s.groups(),
    row,
    keys,
  });
}

async function status(s) {
  await s.goto('/ui');
  const ids = STATUS_FIGURES.map((id) => `#${id}`);
  const tables = Object.values(STATUS_TABLES).map((t) => t.table);
  const rows = Object.values(STATUS_TABLES).map((t) => `${t.table} tr[${t.key}]`);
  const present = [];
  for (const r of rows) if (await s.page.$(r)) present.push(r);
  await s.shoot('status', ['nav', ...ids, ...tables, ...present]);
  const figures = {};
  for (const id of STATUS_FIGURES) figures[id] = await s.figure(`#${id}`);
  const out = { whoami: await s.text('#whoami'), url: s.page.url(), figures };
  for (const [name, t] of Object.entries(STATUS_TABLES)) {
    out[name] = Object.fromEntries((await s.rows(t.table, t.key, t.cells)).map((r) => [r[t.key], r]));
  }
  return s.result(out);
}

async function keys(s) {
  await s.goto('/ui/keys');
  await s.shoot('keys', ['nav', '#whoami', 'form#create-key', 'table#keys', '#groups']);
  return s.result({ whoami: await s.text('#whoami'), groups: await s.groups(), keys: await keyRows(s) });
}

async function revoke(s) {
  const id = need(s.opts, 'key-id');
  const form = `table#keys tr[data-key-id="${id}"] form.revoke`;
  await s.goto('/ui/keys');
  await s.shoot('keys', ['nav', 'table#keys', form]);
  await Promise.all([s.page.waitForNavigation({ waitUntil: 'load' }), s.page.click(`${form} button[type=submit]`)]);
  await s.shoot('revoked', ['nav', 'table#keys']);
  const left = await keyRows(s);
  return s.result({ revoked: id, still_listed: left.some((r) => r['data-key-id'] === id), keys: left });
}

const COMMANDS = {
  async login(s) {
    return (await login(s)).result;
  },
  async 'login-create-key'(s) {
    const l = await login(s);
    return l.done ? l.result : createKey(s);
  },
  'create-key': createKey,
  status,
  keys,
  revoke,
};

// --- main ---------------------------------------------------------------------------------

async function main() {
  let s;
  try {
    const { command, opts } = parseArgs(process.argv.slice(2));
    if (!COMMANDS[command]) throw new Usage(`unknown command ${command ?? '(none)'}; one of ${Object.keys(COMMANDS).join(', ')}`);
    s = new Session(command, opts);
    await s.open({ withState: !command.startsWith('login') });
    const result = await COMMANDS[command](s);
    process.stdout.write(`${JSON.stringify(result)}\n`);
    await s.close();
    process.exit(0);
  } catch (err) {
    const lines = [`browser.mjs ${process.argv[2] ?? ''}: ${err instanceof Usage ? err.message : (err.stack ?? err)}`];
    const out = { error: err.message };
    if (err instanceof Usage) lines.push('usage: node tests/oidc/browser.mjs COMMAND --berth URL [OPTIONS] (see the comment at the top)');
    if (s?.page) {
      out.url = s.page.url();
      lines.push(`  page: ${out.url}`, `  visited: ${s.visited.join(' -> ')}`);
      const text = await s.page.innerText('body', { timeout: 1000 }).catch(() => '');
      if (text) lines.push(`  page text: ${text.replace(/\s+/g, ' ').slice(0, 600)}`);
      out.screenshot = path.join(s.out, `${s.command}-failure.png`);
      await s.page.screenshot({ path: out.screenshot, fullPage: true, timeout: 2000 }).catch(() => { delete out.screenshot; });
      if (out.screenshot) lines.push(`  screenshot: ${out.screenshot}`);
    }
    process.stderr.write(`${lines.join('\n')}\n`);
    process.stdout.write(`${JSON.stringify(out)}\n`);
    await s?.close();
    process.exit(err instanceof Usage ? 2 : 1);
  }
}

main();
