// CUDA graphs for the denoiser step: a thin C ABI over libtorch's
// at::cuda::CUDAGraph (tch does not expose it). build.rs compiles this file
// only where the libtorch it links has CUDA; src/backend/cuda_graph.rs is the
// Rust side. Every function catches C++ exceptions and returns them as a
// message (freed with wg_graph_free_error), so nothing unwinds into Rust.
//
// A capture: wg_graph_side_stream (the capture must run on a stream other
// than the default one; the device is synchronized first so the side stream
// sees every earlier write), warm-up calls, wg_graph_capture_begin, the ops
// to record (tch calls from Rust, on this thread), wg_graph_capture_end,
// wg_graph_default_stream. Replays then run on the current (default) stream,
// ordered after the copies that fill the graph's input tensors.

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <exception>
#include <optional>
#include <string>

namespace {

struct Graph {
  at::cuda::CUDAGraph graph;
  // The stream that was current before wg_graph_side_stream, restored by
  // wg_graph_default_stream (a plain swap, not c10's stream guard, whose
  // inline implementation would tie this file to the CUDA runtime).
  std::optional<c10::cuda::CUDAStream> previous;
};

char* copy_message(const char* what) {
  size_t n = std::strlen(what);
  char* out = new char[n + 1];
  std::memcpy(out, what, n + 1);
  return out;
}

template <typename F>
int guarded(char** error, F f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    *error = copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
  } catch (...) {
    *error = copy_message("unknown C++ exception");
  }
  return 1;
}

}  // namespace

extern "C" {

void* wg_graph_new(char** error) {
  Graph* graph = nullptr;
  guarded(error, [&] { graph = new Graph(); });
  return graph;
}

void wg_graph_free(void* graph) { delete static_cast<Graph*>(graph); }

void wg_graph_free_error(char* error) { delete[] error; }

int wg_graph_side_stream(void* graph, int device, char** error) {
  return guarded(error, [&] {
    auto* g = static_cast<Graph*>(graph);
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::device_synchronize();
    g->previous.emplace(c10::cuda::getCurrentCUDAStream(index));
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, index));
  });
}

int wg_graph_default_stream(void* graph, char** error) {
  return guarded(error, [&] {
    auto* g = static_cast<Graph*>(graph);
    if (g->previous) {
      c10::cuda::getCurrentCUDAStream(g->previous->device_index()).synchronize();
      c10::cuda::setCurrentCUDAStream(*g->previous);
      g->previous.reset();
    }
  });
}

int wg_graph_capture_begin(void* graph, char** error) {
  return guarded(error, [&] {
    // Thread-local mode: only this thread's unsafe CUDA calls (a
    // cudaMalloc, a synchronization) break the capture, not another
    // thread's work on the same device.
    static_cast<Graph*>(graph)->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
  });
}

int wg_graph_capture_end(void* graph, char** error) {
  return guarded(error, [&] { static_cast<Graph*>(graph)->graph.capture_end(); });
}

int wg_graph_replay(void* graph, char** error) {
  return guarded(error, [&] { static_cast<Graph*>(graph)->graph.replay(); });
}

// libtorch's synchronization debugging (torch.cuda.set_sync_debug_mode):
// 0 off, 1 warn at every operation that waits for the device, 2 fail.
void wg_cuda_sync_debug(int level) {
  c10::cuda::warning_state().set_sync_debug_mode(static_cast<c10::cuda::SyncDebugMode>(level));
}

}  // extern "C"
