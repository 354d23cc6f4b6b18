/* Runs the compiled CPU blocks (kernels/cpu_blocks.c) on tables written by Python, without
 * Python: so that the C file can be checked on an architecture this machine does not have,
 * built with a cross compiler and run under qemu user-mode emulation
 * (tests/test_cpu_blocks_emulated.py, which writes the cases and checks the outputs against
 * the reference backend computed on this machine).
 *
 * Usage: cpu_blocks_harness CASE OUT
 *
 * CASE, little-endian: the 8 bytes "DPCASE01"; 16 int64: c, h1, h2, hid1, hid2, g1, g2, group1,
 * group2, pad_to1, pad_to2, height, width, images, dense (0 or 1), 0; then float32 arrays, each
 * an int64 count and its floats: the gated block's fc1_t, fc2a_t, fc2b_t, fc2_b, thresholds,
 * rows, w1_kn, w2_tio, b3 (the dp_block fields of those names, as kernels/cpu_blocks.py lays
 * them out); with dense, an un-gated block's w1, b1, w2, b2, w3, b3 (dp_dense's fields); last,
 * the images' pixels (images x height x width x c, NHWC).
 *
 * OUT: per image, dp_block_forward's status, kept1, kept2, slots1, slots2 and whether it reused
 * the last gather (6 int64), then its output (height x width x c float32); with dense, then per
 * image dp_dense_forward's status (int64) and output. The images go through one dp_block in
 * order, as frames of a stream do, so a repeated image exercises the reuse of a gather.
 */
#include "cpu_blocks.c"

#include <stdio.h>
#include <stdlib.h>

#define SLACK 64 /* floats past every array: the products read whole vectors past a row's end */

static FILE *in;

static void fail(const char *what) {
    fprintf(stderr, "cpu_blocks_harness: %s\n", what);
    exit(2);
}

static void *zeros(int64_t count, size_t size) {
    void *p = calloc((size_t)(count + SLACK), size);
    if (!p) fail("out of memory");
    return p;
}

static int64_t read_int(void) {
    int64_t v;
    if (fread(&v, sizeof v, 1, in) != 1) fail("case file ends early");
    return v;
}

static float *read_floats(int64_t expected) {
    const int64_t n = read_int();
    if (expected >= 0 && n != expected) fail("an array of the case has the wrong length");
    float *p = zeros(n, sizeof(float));
    if ((int64_t)fread(p, sizeof(float), (size_t)n, in) != n) fail("case file ends early");
    return p;
}

static void write_all(FILE *out, const void *p, size_t size, int64_t n) {
    if ((int64_t)fwrite(p, size, (size_t)n, out) != n) fail("cannot write the output");
}

int main(int argc, char **argv) {
    if (argc != 3) fail("usage: cpu_blocks_harness CASE OUT");
    in = fopen(argv[1], "rb");
    if (!in) fail("cannot open the case file");
    char magic[8];
    if (fread(magic, 1, 8, in) != 8 || memcmp(magic, "DPCASE01", 8) != 0) fail("not a case file");
    int64_t head[16];
    for (int i = 0; i < 16; ++i) head[i] = read_int();
    const int64_t c = head[0], h1 = head[1], h2 = head[2], hid1 = head[3], hid2 = head[4], g1 = head[5],
                  g2 = head[6], pad1 = head[9], pad2 = head[10], height = head[11], width = head[12],
                  images = head[13], dense = head[14], taps = 9, hw = height * width;
    const int64_t capacity = h1 + pad1 + h2 + pad2, ld1 = ROUND16(h1 + pad1), ld2 = ROUND16(h2 + pad2);

    dp_block b;
    memset(&b, 0, sizeof b);
    b.c = c, b.h1 = h1, b.h2 = h2, b.hid1 = hid1, b.hid2 = hid2, b.g1 = g1, b.g2 = g2;
    b.group1 = head[7], b.group2 = head[8], b.taps = taps, b.pad_to1 = pad1, b.pad_to2 = pad2;
    b.fc1_t = read_floats(c * (hid1 + hid2));
    b.fc2a_t = read_floats(hid1 * g1);
    b.fc2b_t = read_floats(hid2 * g2);
    b.fc2_b = read_floats(g1 + g2);
    b.thresholds = read_floats(g1 + g2);
    b.rows = read_floats((h1 + h2) * (c + 1));
    b.w1_kn = read_floats(c * h1);
    b.w2_tio = read_floats(taps * h1 * h2);
    b.b3 = read_floats(-1);
    b.pooled = zeros(c, sizeof(double));
    b.chunk_capacity = (hw + POOL_CHUNK - 1) / POOL_CHUNK;
    b.chunk_sums = zeros(b.chunk_capacity * c, sizeof(float));
    b.hidden = zeros(hid1 + hid2, sizeof(float));
    b.saliency = zeros(g1 + g2, sizeof(float));
    b.index = zeros(capacity, sizeof(int64_t));
    b.scale = zeros(capacity, sizeof(float));
    b.rows_out = zeros(capacity * (c + 1), sizeof(float));
    b.counts = zeros(4, sizeof(int64_t));
    b.run_bounds = zeros(h1 + pad1 + 1, sizeof(int64_t));
    b.run_bounds2 = zeros(h2 + pad2 + 1, sizeof(int64_t));
    b.w1_out = zeros(c * ld1, sizeof(float));
    b.b1_out = zeros(ld1, sizeof(float));
    b.w2t_out = zeros(taps * (h1 + pad1) * ld2, sizeof(float));
    b.b2_out = zeros(ld2, sizeof(float));
    b.map_capacity = map_floats(height, width, h1 + pad1, h2 + pad2);
    b.maps = zeros(b.map_capacity, sizeof(float));
    b.gate_seconds = zeros(1, sizeof(double));
    b.macs = zeros(1, sizeof(int64_t));
    b.gathered = zeros(capacity + 2, sizeof(int64_t));
    b.gathered[0] = -1; /* no gather yet */
    b.reused = zeros(1, sizeof(int64_t));
    b.constant_row = zeros(c, sizeof(float));

    dp_dense d;
    memset(&d, 0, sizeof d);
    if (dense) {
        d.c = c, d.h1 = h1, d.h2 = h2, d.taps = taps;
        d.ld1 = ROUND16(h1), d.ld2 = ROUND16(h2), d.ld3 = ROUND16(c);
        d.w1 = read_floats(-1), d.b1 = read_floats(-1), d.w2 = read_floats(-1);
        d.b2 = read_floats(-1), d.w3 = read_floats(-1), d.b3 = read_floats(-1);
        d.map_capacity = map_floats(height, width, h1, h2);
        d.maps = zeros(d.map_capacity, sizeof(float));
        d.macs = zeros(1, sizeof(int64_t));
    }
    const float *pixels = read_floats(images * hw * c);
    fclose(in);

    FILE *out = fopen(argv[2], "wb");
    if (!out) fail("cannot open the output file");
    float *result = zeros(hw * c, sizeof(float));
    for (int64_t i = 0; i < images; ++i) {
        const int64_t status = dp_block_forward(&b, pixels + i * hw * c, height, width, result);
        const int64_t record[6] = {status, b.counts[0], b.counts[1], b.counts[2], b.counts[3], *b.reused};
        write_all(out, record, sizeof(int64_t), 6);
        write_all(out, result, sizeof(float), hw * c);
    }
    for (int64_t i = 0; dense && i < images; ++i) {
        const int64_t status = dp_dense_forward(&d, pixels + i * hw * c, height, width, result);
        write_all(out, &status, sizeof status, 1);
        write_all(out, result, sizeof(float), hw * c);
    }
    if (fclose(out) != 0) fail("cannot write the output");
    return 0;
}
