/* serving_check: answers a SavedModel's signatures through TensorFlow's C loader, as TF
 * Serving does (TF_LoadSessionFromSavedModel, tag "serve", the SignatureDefs of the loaded
 * MetaGraphDef, tensors run by name), without Python and without the server binary.
 *
 * Usage:
 *   serving_check EXPORT_DIR OUT_DIR [--warmup] [REQUEST...]
 *   REQUEST: --run SIGNATURE NAME=FILE.npy | NAME=bytes:FILE[,FILE...] ...
 *          | --requests FILE          (a TFRecord of tensorflow.serving.PredictionLog)
 *
 * --warmup replays EXPORT_DIR/assets.extra/tf_serving_warmup_requests (as TF Serving does at
 * load) before the requests. Requests run in order in one session; request k writes
 * OUT_DIR/request_<k>.<output key>.npy per output, or OUT_DIR/request_<k>.error.txt with
 * the TF_Status message when the model refuses it (the next request still runs). stdout gets
 * one line per step: "load <ms>", "warmup <n requests> <ms>", "request <k> <signature>
 * ok|error <ms>". The exit status is 1 on a usage or load error, 0 otherwise.
 *
 * The protos are read with a small protobuf wire-format reader (only the fields needed:
 * MetaGraphDef.signature_def, SignatureDef inputs/outputs, TensorInfo name/dtype, and
 * PredictionLog.predict_log.request's signature name and TensorProto inputs). Supported
 * tensor dtypes: uint8, int32, int64, float32, float64, string (a string output is written
 * as fixed-width bytes, numpy dtype 'S<longest>').
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tensorflow/c/c_api.h"

#define MAX_IO 16
#define MAX_SIGS 32
#define MAX_DIMS 8

static void die(const char *fmt, const char *arg) {
  fprintf(stderr, "serving_check: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\n");
  exit(1);
}

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static char *read_file(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  size_t cap = 1 << 16, n = 0, got;
  char *data = malloc(cap);
  while ((got = fread(data + n, 1, cap - n, f)) > 0) {
    n += got;
    if (n == cap) data = realloc(data, cap *= 2);
  }
  fclose(f);
  *size = n;
  return data;
}

/* ---- protobuf wire format ---------------------------------------------------------------- */
typedef struct { const uint8_t *p, *end; } Buf;
typedef struct { int field, wire; uint64_t value; Buf bytes; } Field;

static int varint(Buf *b, uint64_t *out) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64 && b->p < b->end; shift += 7) {
    uint8_t byte = *b->p++;
    v |= (uint64_t)(byte & 0x7f) << shift;
    if (!(byte & 0x80)) { *out = v; return 1; }
  }
  return 0;
}

/* Next field of `b` into `f`; 0 at the end; dies on malformed data. */
static int next_field(Buf *b, Field *f) {
  uint64_t tag, len;
  if (b->p >= b->end) return 0;
  if (!varint(b, &tag)) die("%s", "malformed protobuf (tag)");
  f->field = (int)(tag >> 3);
  f->wire = (int)(tag & 7);
  switch (f->wire) {
    case 0: if (!varint(b, &f->value)) die("%s", "malformed protobuf (varint)"); break;
    case 1: if (b->end - b->p < 8) die("%s", "malformed protobuf"); memcpy(&f->value, b->p, 8); b->p += 8; break;
    case 5: if (b->end - b->p < 4) die("%s", "malformed protobuf"); f->value = 0; memcpy(&f->value, b->p, 4); b->p += 4; break;
    case 2:
      if (!varint(b, &len) || len > (uint64_t)(b->end - b->p)) die("%s", "malformed protobuf (length)");
      f->bytes.p = b->p; f->bytes.end = b->p + len; b->p += len; break;
    default: die("%s", "unsupported protobuf wire type");
  }
  return 1;
}

static char *str_of(Buf b) {
  size_t n = b.end - b.p;
  char *s = malloc(n + 1);
  memcpy(s, b.p, n);
  s[n] = 0;
  return s;
}

/* ---- SignatureDefs ------------------------------------------------------------------------ */
typedef struct { char *key, *tensor; int dtype; } TensorInfo;
typedef struct {
  char *name;
  int n_in, n_out;
  TensorInfo in[MAX_IO], out[MAX_IO];
} Signature;

static Signature sigs[MAX_SIGS];
static int n_sigs;

/* map<string, TensorInfo> entry: key = 1, value = 2 (TensorInfo: name = 1, dtype = 2). */
static void parse_tensor_info_entry(Buf entry, TensorInfo *info) {
  Field f, g;
  memset(info, 0, sizeof *info);
  while (next_field(&entry, &f)) {
    if (f.field == 1 && f.wire == 2) info->key = str_of(f.bytes);
    if (f.field == 2 && f.wire == 2) {
      Buf v = f.bytes;
      while (next_field(&v, &g)) {
        if (g.field == 1 && g.wire == 2) info->tensor = str_of(g.bytes);
        if (g.field == 2 && g.wire == 0) info->dtype = (int)g.value;
      }
    }
  }
  if (!info->key || !info->tensor) die("%s", "a SignatureDef input or output without a tensor name");
}

/* MetaGraphDef.signature_def = 5: map<string, SignatureDef> (inputs = 1, outputs = 2). */
static void parse_signatures(Buf meta) {
  Field f, g, h;
  while (next_field(&meta, &f)) {
    if (f.field != 5 || f.wire != 2) continue;
    if (n_sigs == MAX_SIGS) die("%s", "too many signatures");
    Signature *s = &sigs[n_sigs++];
    memset(s, 0, sizeof *s);
    Buf entry = f.bytes;
    while (next_field(&entry, &g)) {
      if (g.field == 1 && g.wire == 2) s->name = str_of(g.bytes);
      if (g.field != 2 || g.wire != 2) continue;
      Buf def = g.bytes;
      while (next_field(&def, &h)) {
        if (h.wire != 2 || (h.field != 1 && h.field != 2)) continue;
        int *n = h.field == 1 ? &s->n_in : &s->n_out;
        if (*n == MAX_IO) die("%s", "too many signature inputs or outputs");
        parse_tensor_info_entry(h.bytes, h.field == 1 ? &s->in[*n] : &s->out[*n]);
        ++*n;
      }
    }
  }
}

static Signature *find_signature(const char *name) {
  for (int i = 0; i < n_sigs; i++)
    if (strcmp(sigs[i].name, name) == 0) return &sigs[i];
  return NULL;
}

/* "op:index" -> TF_Output of `graph`. */
static TF_Output graph_output(TF_Graph *graph, const char *tensor) {
  char op[1024];
  const char *colon = strrchr(tensor, ':');
  size_t n = colon ? (size_t)(colon - tensor) : strlen(tensor);
  if (n >= sizeof op) die("tensor name too long: %s", tensor);
  memcpy(op, tensor, n);
  op[n] = 0;
  TF_Output out = {TF_GraphOperationByName(graph, op), colon ? atoi(colon + 1) : 0};
  if (!out.oper) die("the graph has no operation for tensor %s", tensor);
  return out;
}

/* ---- tensors ------------------------------------------------------------------------------ */
static size_t dtype_size(int dtype) {
  switch (dtype) {
    case TF_UINT8: return 1;
    case TF_INT32: case TF_FLOAT: return 4;
    case TF_INT64: case TF_DOUBLE: return 8;
    default: return 0;
  }
}

static int64_t num_elements(const int64_t *dims, int rank) {
  int64_t n = 1;
  for (int i = 0; i < rank; i++) n *= dims[i];
  return n;
}

/* A 1-D string tensor of `n` elements; element i = data[i] (sizes[i] bytes). */
static TF_Tensor *string_tensor(char **data, const size_t *sizes, int64_t n) {
  TF_Tensor *t = TF_AllocateTensor(TF_STRING, &n, 1, n * sizeof(TF_TString));
  TF_TString *s = (TF_TString *)TF_TensorData(t);
  for (int64_t i = 0; i < n; i++) {
    TF_TString_Init(&s[i]);
    TF_TString_Copy(&s[i], data[i], sizes[i]);
  }
  return t;
}

/* .npy (version 1-3, C order, little-endian |u1 <i4 <i8 <f4 <f8) -> tensor. */
static TF_Tensor *read_npy(const char *path) {
  size_t size;
  char *data = read_file(path, &size);
  if (!data) die("cannot read %s", path);
  if (size < 10 || memcmp(data, "\x93NUMPY", 6) != 0) die("%s is not a .npy file", path);
  const uint8_t *u = (const uint8_t *)data;
  size_t header_len = data[6] == 1 ? (size_t)(u[8] | u[9] << 8)
                                   : (size_t)u[8] | (size_t)u[9] << 8 | (size_t)u[10] << 16 | (size_t)u[11] << 24;
  size_t start = (data[6] == 1 ? 10 : 12) + header_len;
  if (start > size) die("%s: truncated .npy header", path);
  char *header = strndup(data + (data[6] == 1 ? 10 : 12), header_len);
  static const struct { const char *descr; int dtype; } kinds[] = {
      {"'|u1'", TF_UINT8}, {"'<i4'", TF_INT32}, {"'<i8'", TF_INT64}, {"'<f4'", TF_FLOAT}, {"'<f8'", TF_DOUBLE}};
  int dtype = -1;
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
    if (strstr(header, kinds[i].descr)) dtype = kinds[i].dtype;
  if (dtype < 0) die("%s: unsupported .npy dtype (uint8, int32, int64, float32, float64)", path);
  if (strstr(header, "'fortran_order': True")) die("%s: Fortran-order .npy not supported", path);
  char *shape = strstr(header, "'shape': (");
  if (!shape) die("%s: .npy header without a shape", path);
  int64_t dims[MAX_DIMS];
  int rank = 0;
  for (char *p = shape + 10; *p && *p != ')';) {
    if (*p >= '0' && *p <= '9') {
      if (rank == MAX_DIMS) die("%s: rank over 8", path);
      dims[rank++] = strtoll(p, &p, 10);
    } else {
      p++;
    }
  }
  size_t bytes = (size_t)num_elements(dims, rank) * dtype_size(dtype);
  if (start + bytes > size) die("%s: truncated .npy data", path);
  TF_Tensor *t = TF_AllocateTensor((TF_DataType)dtype, dims, rank, bytes);
  memcpy(TF_TensorData(t), data + start, bytes);
  free(header);
  free(data);
  return t;
}

static void write_npy(const char *path, const TF_Tensor *t) {
  const char *descr = NULL;
  char bytes_descr[32];
  size_t width = 0;   /* a string tensor: fixed-width bytes ('|S<width>', NUL-padded) */
  int64_t count = 1;
  for (int i = 0; i < TF_NumDims(t); i++) count *= TF_Dim(t, i);
  switch (TF_TensorType(t)) {
    case TF_UINT8: descr = "|u1"; break;
    case TF_INT32: descr = "<i4"; break;
    case TF_INT64: descr = "<i8"; break;
    case TF_FLOAT: descr = "<f4"; break;
    case TF_DOUBLE: descr = "<f8"; break;
    case TF_STRING:
      for (int64_t i = 0; i < count; i++) {
        size_t size = TF_TString_GetSize(&((const TF_TString *)TF_TensorData(t))[i]);
        if (size > width) width = size;
      }
      if (width == 0) width = 1;
      snprintf(bytes_descr, sizeof bytes_descr, "|S%zu", width);
      descr = bytes_descr;
      break;
    default: die("an output of %s has an unsupported dtype", path);
  }
  char shape[256] = "", header[512];
  for (int i = 0; i < TF_NumDims(t); i++)
    snprintf(shape + strlen(shape), sizeof shape - strlen(shape), "%lld,%s", (long long)TF_Dim(t, i),
             i + 1 < TF_NumDims(t) ? " " : "");
  if (TF_NumDims(t) > 1) shape[strlen(shape) - 1] = 0;   /* "(2, 3)", "(3,)", "()" */
  int n = snprintf(header, sizeof header, "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }", descr, shape);
  int total = 10 + n + 1, pad = (64 - total % 64) % 64;
  FILE *f = fopen(path, "wb");
  if (!f) die("cannot write %s", path);
  uint16_t len = (uint16_t)(n + pad + 1);
  fwrite("\x93NUMPY\x01\x00", 1, 8, f);
  fputc(len & 0xff, f);
  fputc(len >> 8, f);
  fwrite(header, 1, n, f);
  for (int i = 0; i < pad; i++) fputc(' ', f);
  fputc('\n', f);
  if (TF_TensorType(t) == TF_STRING) {
    const TF_TString *s = (const TF_TString *)TF_TensorData(t);
    for (int64_t i = 0; i < count; i++) {
      size_t size = TF_TString_GetSize(&s[i]);
      fwrite(TF_TString_GetDataPointer(&s[i]), 1, size, f);
      for (size_t j = size; j < width; j++) fputc(0, f);
    }
  } else {
    fwrite(TF_TensorData(t), 1, TF_TensorByteSize(t), f);
  }
  fclose(f);
}

/* TensorProto (dtype 1, tensor_shape 2, tensor_content 4, float_val 5, double_val 6,
 * int_val 7, string_val 8, int64_val 10) -> tensor. A single typed value fills the shape. */
static TF_Tensor *tensor_from_proto(Buf proto) {
  Field f, g, h;
  int dtype = 0, rank = 0;
  int64_t dims[MAX_DIMS];
  Buf content = {NULL, NULL};
  uint64_t *values = NULL;   /* typed repeated values, raw bits */
  size_t n_values = 0, cap = 0;
  char **strings = NULL;
  size_t *string_sizes = NULL, n_strings = 0;
  while (next_field(&proto, &f)) {
    if (f.field == 1 && f.wire == 0) dtype = (int)f.value;
    else if (f.field == 2 && f.wire == 2) {
      Buf shape = f.bytes;
      while (next_field(&shape, &g)) {
        if (g.field != 2 || g.wire != 2) continue;
        if (rank == MAX_DIMS) die("%s", "a TensorProto of rank over 8");
        dims[rank] = 0;
        for (Buf dim = g.bytes; next_field(&dim, &h);)
          if (h.field == 1 && h.wire == 0) dims[rank] = (int64_t)h.value;
        rank++;
      }
    } else if (f.field == 4 && f.wire == 2) content = f.bytes;
    else if (f.field == 8 && f.wire == 2) {
      strings = realloc(strings, (n_strings + 1) * sizeof *strings);
      string_sizes = realloc(string_sizes, (n_strings + 1) * sizeof *string_sizes);
      strings[n_strings] = (char *)f.bytes.p;
      string_sizes[n_strings++] = f.bytes.end - f.bytes.p;
    } else if (f.field == 5 || f.field == 6 || f.field == 7 || f.field == 10) {
      Buf packed = f.bytes;
      int fixed = f.field == 5 ? 4 : f.field == 6 ? 8 : 0;
      for (;;) {
        uint64_t v;
        if (f.wire != 2) v = f.value;
        else if (packed.p >= packed.end) break;
        else if (fixed) { v = 0; memcpy(&v, packed.p, fixed); packed.p += fixed; }
        else if (!varint(&packed, &v)) die("%s", "malformed packed TensorProto values");
        if (n_values == cap) values = realloc(values, (cap = cap ? 2 * cap : 64) * sizeof *values);
        values[n_values++] = v;
        if (f.wire != 2) break;
      }
    }
  }
  int64_t n = num_elements(dims, rank);
  if (dtype == TF_STRING) {
    if ((int64_t)n_strings != n || rank != 1) die("%s", "only 1-D string TensorProtos with one string_val per element are supported");
    TF_Tensor *t = string_tensor(strings, string_sizes, n);
    free(strings);
    free(string_sizes);
    return t;
  }
  size_t item = dtype_size(dtype);
  if (!item) die("%s", "a TensorProto of an unsupported dtype (uint8, int32, int64, float32, float64, string)");
  TF_Tensor *t = TF_AllocateTensor((TF_DataType)dtype, dims, rank, n * item);
  uint8_t *out = TF_TensorData(t);
  if (content.p) {
    if ((size_t)(content.end - content.p) != n * item) die("%s", "a TensorProto whose tensor_content does not match its shape");
    memcpy(out, content.p, n * item);
  } else {
    if (n_values == 0 || (n_values != (size_t)n && n_values != 1)) die("%s", "a TensorProto whose values do not match its shape");
    for (int64_t i = 0; i < n; i++) {
      uint64_t v = values[n_values == 1 ? 0 : i];
      if (item == 1) out[i] = (uint8_t)v;                       /* int_val */
      else if (item == 4) { uint32_t w = (uint32_t)v; memcpy(out + 4 * i, &w, 4); }  /* float bits or int32 */
      else memcpy(out + 8 * i, &v, 8);
    }
  }
  free(values);
  return t;
}

/* ---- requests ---------------------------------------------------------------------------- */
typedef struct {
  char *signature;
  int n;
  char *keys[MAX_IO];
  TF_Tensor *tensors[MAX_IO];
} Request;

static void free_request(Request *r) {
  for (int i = 0; i < r->n; i++) {
    TF_DeleteTensor(r->tensors[i]);
    free(r->keys[i]);
  }
  free(r->signature);
  memset(r, 0, sizeof *r);
}

/* PredictionLog.predict_log (6) .request (1): model_spec (1) .signature_name (3),
 * inputs (2): map<string, TensorProto>. Returns 0 for another kind of log. */
static int request_from_prediction_log(Buf log, Request *r) {
  Field f, g, h, k;
  memset(r, 0, sizeof *r);
  while (next_field(&log, &f)) {
    if (f.field != 6 || f.wire != 2) continue;
    for (Buf predict_log = f.bytes; next_field(&predict_log, &g);) {
      if (g.field != 1 || g.wire != 2) continue;
      for (Buf request = g.bytes; next_field(&request, &h);) {
        if (h.field == 1 && h.wire == 2) {
          for (Buf spec = h.bytes; next_field(&spec, &k);)
            if (k.field == 3 && k.wire == 2) r->signature = str_of(k.bytes);
        } else if (h.field == 2 && h.wire == 2) {
          if (r->n == MAX_IO) die("%s", "a PredictRequest with too many inputs");
          for (Buf entry = h.bytes; next_field(&entry, &k);) {
            if (k.field == 1 && k.wire == 2) r->keys[r->n] = str_of(k.bytes);
            if (k.field == 2 && k.wire == 2) r->tensors[r->n] = tensor_from_proto(k.bytes);
          }
          if (!r->keys[r->n] || !r->tensors[r->n]) die("%s", "a PredictRequest input without a name or tensor");
          r->n++;
        }
      }
    }
  }
  if (!r->signature) r->signature = strdup("serving_default");   /* TF Serving's default */
  return r->n > 0;
}

/* CRC-32C (Castagnoli), masked as TFRecord does. */
static uint32_t crc32c(const uint8_t *p, size_t n) {
  uint32_t crc = 0xffffffff;
  while (n--) {
    crc ^= *p++;
    for (int i = 0; i < 8; i++) crc = (crc >> 1) ^ (0x82f63b78 & -(crc & 1));
  }
  return ~crc;
}

static uint32_t masked_crc(const uint8_t *p, size_t n) {
  uint32_t crc = crc32c(p, n);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

/* Every record of a TFRecord file (checksums verified) as a Request; returns the count. */
static int read_tfrecord_requests(const char *path, Request **out) {
  size_t size, pos = 0;
  uint8_t *data = (uint8_t *)read_file(path, &size);
  if (!data) die("cannot read %s", path);
  int n = 0;
  *out = NULL;
  while (pos < size) {
    uint64_t len;
    uint32_t crc;
    if (size - pos < 12) die("%s: truncated TFRecord", path);
    memcpy(&len, data + pos, 8);
    memcpy(&crc, data + pos + 8, 4);
    if (crc != masked_crc(data + pos, 8)) die("%s: TFRecord length checksum mismatch", path);
    if (size - pos < 16 || len > size - pos - 16) die("%s: truncated TFRecord", path);
    memcpy(&crc, data + pos + 12 + len, 4);
    if (crc != masked_crc(data + pos + 12, len)) die("%s: TFRecord data checksum mismatch", path);
    Buf log = {data + pos + 12, data + pos + 12 + len};
    *out = realloc(*out, (n + 1) * sizeof **out);
    if (request_from_prediction_log(log, &(*out)[n])) n++;
    pos += 16 + len;
  }
  free(data);
  return n;
}

/* --run SIGNATURE NAME=FILE.npy | NAME=bytes:FILE[,FILE...] ... */
static int request_from_args(char **argv, int argc, Request *r) {
  int used = 0;
  memset(r, 0, sizeof *r);
  r->signature = strdup(argv[used++]);
  for (; used < argc && strncmp(argv[used], "--", 2) != 0; used++) {
    char *eq = strchr(argv[used], '=');
    if (!eq) die("expected NAME=FILE, got %s", argv[used]);
    if (r->n == MAX_IO) die("%s", "too many inputs");
    r->keys[r->n] = strndup(argv[used], eq - argv[used]);
    if (strncmp(eq + 1, "bytes:", 6) == 0) {
      char *list = strdup(eq + 7), *save = NULL;
      char *files[256];
      size_t sizes[256];
      int64_t k = 0;
      for (char *p = strtok_r(list, ",", &save); p; p = strtok_r(NULL, ",", &save)) {
        if (k == 256) die("%s", "over 256 files in one string input");
        if (!(files[k] = read_file(p, &sizes[k]))) die("cannot read %s", p);
        k++;
      }
      r->tensors[r->n] = string_tensor(files, sizes, k);
      for (int64_t i = 0; i < k; i++) free(files[i]);
      free(list);
    } else {
      r->tensors[r->n] = read_npy(eq + 1);
    }
    r->n++;
  }
  return used;
}

/* Runs `r` in `session`; writes its outputs (or error) under out_prefix when given. */
static int run_request(TF_Session *session, TF_Graph *graph, const Request *r, const char *out_prefix) {
  TF_Status *status = TF_NewStatus();
  Signature *s = find_signature(r->signature);
  char path[4096];
  int ok = 0;
  if (!s) {
    TF_SetStatus(status, TF_INVALID_ARGUMENT, "no such signature");
  } else {
    TF_Output inputs[MAX_IO], outputs[MAX_IO];
    TF_Tensor *values[MAX_IO] = {0};
    int matched = 0;
    for (int i = 0; i < r->n; i++)
      for (int j = 0; j < s->n_in; j++)
        if (strcmp(r->keys[i], s->in[j].key) == 0) {
          inputs[i] = graph_output(graph, s->in[j].tensor);
          matched++;
        }
    for (int j = 0; j < s->n_out; j++) outputs[j] = graph_output(graph, s->out[j].tensor);
    if (matched != r->n || r->n != s->n_in) {
      TF_SetStatus(status, TF_INVALID_ARGUMENT, "the request's input names differ from the signature's");
    } else {
      TF_SessionRun(session, NULL, inputs, r->tensors, r->n, outputs, values, s->n_out, NULL, 0,
                    NULL, status);
    }
    ok = TF_GetCode(status) == TF_OK;
    for (int j = 0; j < s->n_out; j++) {
      if (ok && out_prefix) {
        snprintf(path, sizeof path, "%s.%s.npy", out_prefix, s->out[j].key);
        write_npy(path, values[j]);
      }
      if (values[j]) TF_DeleteTensor(values[j]);
    }
  }
  if (!ok && out_prefix) {
    snprintf(path, sizeof path, "%s.error.txt", out_prefix);
    FILE *f = fopen(path, "w");
    if (!f) die("cannot write %s", path);
    fputs(TF_Message(status), f);
    fclose(f);
  }
  TF_DeleteStatus(status);
  return ok;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: serving_check EXPORT_DIR OUT_DIR [--warmup] [--run SIGNATURE NAME=FILE.npy|NAME=bytes:FILE[,FILE]...]... [--requests PREDICTION_LOGS.tfrecord]...\n");
    return 1;
  }
  const char *export_dir = argv[1], *out_dir = argv[2];
  /* Parse every argument before loading (a bad argument fails before the heavy work). */
  Request *requests = NULL;
  int n_requests = 0, warmup = 0;
  for (int i = 3; i < argc;) {
    Request *more = NULL;
    int n_more = 0;
    if (strcmp(argv[i], "--warmup") == 0) { warmup = 1; i++; continue; }
    if (strcmp(argv[i], "--run") == 0 && i + 1 < argc) {
      more = malloc(sizeof *more);
      i += 1 + request_from_args(argv + i + 1, argc - i - 1, more);
      n_more = 1;
    } else if (strcmp(argv[i], "--requests") == 0 && i + 1 < argc) {
      n_more = read_tfrecord_requests(argv[i + 1], &more);
      i += 2;
    } else {
      die("unexpected argument %s (see the usage line)", argv[i]);
    }
    requests = realloc(requests, (n_requests + n_more) * sizeof *requests);
    memcpy(requests + n_requests, more, n_more * sizeof *more);
    n_requests += n_more;
    free(more);
  }

  double start = now_ms();
  TF_Status *status = TF_NewStatus();
  TF_Graph *graph = TF_NewGraph();
  TF_SessionOptions *options = TF_NewSessionOptions();
  TF_Buffer *meta = TF_NewBuffer();
  const char *tags[] = {"serve"};
  TF_Session *session = TF_LoadSessionFromSavedModel(options, NULL, export_dir, tags, 1, graph,
                                                     meta, status);
  if (TF_GetCode(status) != TF_OK) die("could not load the SavedModel: %s", TF_Message(status));
  Buf meta_buf = {meta->data, (const uint8_t *)meta->data + meta->length};
  parse_signatures(meta_buf);
  printf("load %.3f\n", now_ms() - start);
  fflush(stdout);

  if (warmup) {
    char path[4096];
    Request *logs;
    snprintf(path, sizeof path, "%s/assets.extra/tf_serving_warmup_requests", export_dir);
    start = now_ms();
    int n = read_tfrecord_requests(path, &logs);
    for (int i = 0; i < n; i++) {
      if (!run_request(session, graph, &logs[i], NULL))
        die("warm-up request for %s failed", logs[i].signature);
      free_request(&logs[i]);
    }
    free(logs);
    printf("warmup %d %.3f\n", n, now_ms() - start);
    fflush(stdout);
  }

  for (int k = 0; k < n_requests; k++) {
    char prefix[4096];
    snprintf(prefix, sizeof prefix, "%s/request_%d", out_dir, k);
    start = now_ms();
    int ok = run_request(session, graph, &requests[k], prefix);
    printf("request %d %s %s %.3f\n", k, requests[k].signature, ok ? "ok" : "error", now_ms() - start);
    fflush(stdout);
    free_request(&requests[k]);
  }
  free(requests);
  TF_CloseSession(session, status);
  TF_DeleteSession(session, status);
  TF_DeleteBuffer(meta);
  TF_DeleteSessionOptions(options);
  TF_DeleteGraph(graph);
  TF_DeleteStatus(status);
  return 0;
}
