// node --test: decodePng against PNGs built here with every scanline filter, and
// checkScreenshot on blank and drawn images.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import zlib from 'node:zlib';
import { decodePng, checkScreenshot } from './png.mjs';

// CRC-32 of PNG chunks (ISO 3309), so that the test PNGs are valid files.
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
const crc32 = (buf) => {
  let c = 0xffffffff;
  for (const b of buf) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
};
const chunk = (type, data) => {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, 'latin1');
  data.copy(out, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
  return out;
};

// Applies PNG filter `f` to `line` given the previous (unfiltered) line.
const filterLine = (f, line, prev, bpp) => {
  const out = Buffer.alloc(line.length);
  for (let i = 0; i < line.length; i++) {
    const a = i >= bpp ? line[i - bpp] : 0;
    const b = prev[i];
    const c = i >= bpp ? prev[i - bpp] : 0;
    const p = a + b - c;
    const paeth = Math.abs(p - a) <= Math.abs(p - b) && Math.abs(p - a) <= Math.abs(p - c) ? a : Math.abs(p - b) <= Math.abs(p - c) ? b : c;
    out[i] = (line[i] - [0, a, b, (a + b) >> 1, paeth][f]) & 0xff;
  }
  return out;
};

// A PNG of `width` x `height` pixels from `px(x, y)` -> [r, g, b, a]; row y uses filter y % 5.
function encode(width, height, channels, px) {
  const stride = width * channels;
  const rows = [];
  let prev = Buffer.alloc(stride);
  for (let y = 0; y < height; y++) {
    const line = Buffer.alloc(stride);
    for (let x = 0; x < width; x++) px(x, y).slice(0, channels).forEach((v, i) => { line[x * channels + i] = v; });
    rows.push(Buffer.from([y % 5]), filterLine(y % 5, line, prev, channels));
    prev = line;
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8;
  ihdr[9] = channels === 4 ? 6 : 2;
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr), chunk('IDAT', zlib.deflateSync(Buffer.concat(rows))), chunk('IEND', Buffer.alloc(0)),
  ]);
}

const gradient = (x, y) => [(x * 37 + y * 11) & 0xff, (x * 5 + y * 71) & 0xff, (x * y) & 0xff, (200 + x + y) & 0xff];

for (const channels of [3, 4]) {
  test(`decodes ${channels === 3 ? 'RGB' : 'RGBA'} with every filter`, () => {
    const img = decodePng(encode(13, 11, channels, gradient));
    assert.equal(img.width, 13);
    assert.equal(img.height, 11);
    for (let y = 0; y < 11; y++) {
      for (let x = 0; x < 13; x++) {
        const want = gradient(x, y);
        if (channels === 3) want[3] = 255;
        assert.deepEqual([...img.rgba.subarray((y * 13 + x) * 4, (y * 13 + x) * 4 + 4)], want, `pixel ${x},${y}`);
      }
    }
  });
}

test('rejects what it does not decode', () => {
  assert.throws(() => decodePng(Buffer.from('GIF89a')), /not a PNG/);
  const png = encode(2, 2, 3, gradient);
  png[8 + 8 + 8] = 16; // IHDR bit depth (the CRC is not checked)
  assert.throws(() => decodePng(png), /unsupported PNG: bit depth 16/);
});

const white = () => [255, 255, 255, 255];
// A white 40x20 image with a black 10x4 bar at (5, 5).
const bar = (x, y) => (x >= 5 && x < 15 && y >= 5 && y < 9 ? [0, 0, 0, 255] : white());

test('a blank screenshot fails, a drawn one passes', () => {
  assert.throws(() => checkScreenshot(encode(40, 20, 3, white)), /looks blank: 1 colours/);
  const stats = checkScreenshot(encode(40, 20, 3, bar), [{ selector: '#bar', box: { x: 4, y: 4, width: 12, height: 6 } }]);
  assert.equal(stats.colours, 2);
  assert.equal(stats.background, '#ffffffff');
  assert.equal(stats.ink, 40 / 800);
});

test('an element must have a size, lie inside, and show something', () => {
  const png = encode(40, 20, 3, bar);
  assert.throws(() => checkScreenshot(png, [{ selector: '#a', box: { x: 1, y: 1, width: 0, height: 5 } }]), /#a has no size/);
  assert.throws(() => checkScreenshot(png, [{ selector: '#a', box: null }]), /#a has no size/);
  assert.throws(() => checkScreenshot(png, [{ selector: '#a', box: { x: 35, y: 1, width: 10, height: 5 } }]), /#a .* is outside the 40x20 image/);
  assert.throws(() => checkScreenshot(png, [{ selector: '#a', box: { x: 20, y: 10, width: 10, height: 5 } }]), /#a .* shows nothing/);
  checkScreenshot(png, [{ selector: '#a', box: { x: 20, y: 10, width: 10, height: 5 }, ink: false }]);
});
