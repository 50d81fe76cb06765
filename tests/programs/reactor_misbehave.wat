;; reactor_misbehave.wat: one reactor per failure mode of a warm WASM worker, chosen by the
;; input's first byte (the rest of the input is echoed where a mode returns output):
;;   c  count: a counter that _initialize sets to 100, +1 per call, as 4 bytes little-endian
;;   e  echo the input
;;   w  write "log line\n" to stderr, then echo
;;   f  report failure: return -7
;;   t  trap (unreachable)
;;   l  loop forever
;;   g  grow memory a page at a time until memory.grow fails, then trap
;;   o  return all of memory as output
;;   x  return an output range past the end of memory
;;   b  busy: count down from 2^25 (tens of milliseconds), then echo
;;   s  sleep an hour (poll_oneoff, one relative clock subscription), then echo
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $count (mut i32) (i32.const 0))
  (data (i32.const 16) "log line\n")
  (func (export "_initialize") (global.set $count (i32.const 100)))
  (func (export "spear_alloc") (param $len i32) (result i32)
    (local $need i32)
    (local.set $need
      (i32.sub
        (i32.shr_u (i32.add (i32.add (local.get $len) (i32.const 1024)) (i32.const 65535))
                   (i32.const 16))
        (memory.size)))
    (if (i32.gt_s (local.get $need) (i32.const 0))
      (then
        (if (i32.eq (memory.grow (local.get $need)) (i32.const -1))
          (then (return (i32.const 0))))))
    (i32.const 1024))
  (func $packed (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $len)) (i64.const 32))
            (i64.extend_i32_u (local.get $ptr))))
  (func (export "spear_handle") (param $ptr i32) (param $len i32) (result i64)
    (local $mode i32)
    (if (i32.eqz (local.get $len)) (then (return (i64.const 0))))
    (local.set $mode (i32.load8_u (local.get $ptr)))
    (if (i32.eq (local.get $mode) (i32.const 99))  ;; c
      (then
        (global.set $count (i32.add (global.get $count) (i32.const 1)))
        (i32.store (i32.const 512) (global.get $count))
        (return (call $packed (i32.const 512) (i32.const 4)))))
    (if (i32.eq (local.get $mode) (i32.const 119))  ;; w
      (then
        (i32.store (i32.const 0) (i32.const 16))
        (i32.store (i32.const 4) (i32.const 9))
        (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))))
    (if (i32.eq (local.get $mode) (i32.const 102))  ;; f
      (then (return (i64.const -7))))
    (if (i32.eq (local.get $mode) (i32.const 116))  ;; t
      (then unreachable))
    (if (i32.eq (local.get $mode) (i32.const 108))  ;; l
      (then (loop $forever (br $forever))))
    (if (i32.eq (local.get $mode) (i32.const 103))  ;; g
      (then
        (loop $more
          (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
        unreachable))
    (if (i32.eq (local.get $mode) (i32.const 111))  ;; o
      (then
        (return (call $packed (i32.const 0) (i32.mul (memory.size) (i32.const 65536))))))
    (if (i32.eq (local.get $mode) (i32.const 115))  ;; s: subscription at 128, event at 192
      (then
        (i64.store (i32.const 128) (i64.const 7))
        (i32.store8 (i32.const 136) (i32.const 0))
        (i32.store (i32.const 144) (i32.const 1))
        (i64.store (i32.const 152) (i64.const 3600000000000))
        (i64.store (i32.const 160) (i64.const 0))
        (i32.store16 (i32.const 168) (i32.const 0))
        (drop (call $poll (i32.const 128) (i32.const 192) (i32.const 1) (i32.const 240)))))
    (if (i32.eq (local.get $mode) (i32.const 98))  ;; b
      (then
        (local.set $mode (i32.const 33554432))
        (loop $spin
          (local.set $mode (i32.sub (local.get $mode) (i32.const 1)))
          (br_if $spin (local.get $mode)))))
    (if (i32.eq (local.get $mode) (i32.const 120))  ;; x
      (then
        (return (call $packed (i32.mul (memory.size) (i32.const 65536)) (i32.const 16)))))
    (call $packed (local.get $ptr) (local.get $len))))
