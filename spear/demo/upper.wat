;; upper.wat: the quick-start function of `spear demo`.
;;
;; A WASI command module (the per-call contract, DESIGN.md section 5): it reads stdin to the
;; end and writes it back to stdout with ASCII letters upper-cased; every other byte passes
;; through unchanged. It streams in 64 KiB chunks, so input of any size needs no more memory.
;; Exit status: 0 on success, 1 if reading or writing fails.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit"
    (func $proc_exit (param i32)))

  ;; Memory layout: [0, 8) one iovec {buf, len}; [8, 12) the byte count a call reports;
  ;; [1024, 1024 + 65536) the chunk buffer. Two pages hold it all.
  (memory (export "memory") 2)
  (global $iovec i32 (i32.const 0))
  (global $count i32 (i32.const 8))
  (global $buf i32 (i32.const 1024))
  (global $buf_len i32 (i32.const 65536))

  ;; Upper-case the ASCII letters in [ptr, ptr + len) in place.
  (func $upper (param $ptr i32) (param $len i32)
    (local $end i32)
    (local $c i32)
    (local.set $end (i32.add (local.get $ptr) (local.get $len)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $ptr) (local.get $end)))
        (local.set $c (i32.load8_u (local.get $ptr)))
        ;; 'a'..'z' is 97..122: c - 97 <= 25 as unsigned
        (if (i32.le_u (i32.sub (local.get $c) (i32.const 97)) (i32.const 25))
          (then (i32.store8 (local.get $ptr) (i32.sub (local.get $c) (i32.const 32)))))
        (local.set $ptr (i32.add (local.get $ptr) (i32.const 1)))
        (br $next))))

  ;; Write [ptr, ptr + len) to stdout, looping over partial writes; return 0 or an errno.
  (func $write_all (param $ptr i32) (param $len i32) (result i32)
    (local $err i32)
    (local $n i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (global.get $iovec) (local.get $ptr))
        (i32.store (i32.add (global.get $iovec) (i32.const 4)) (local.get $len))
        (local.set $err
          (call $fd_write (i32.const 1) (global.get $iovec) (i32.const 1) (global.get $count)))
        (if (local.get $err) (then (return (local.get $err))))
        (local.set $n (i32.load (global.get $count)))
        ;; a write that makes no progress would loop forever: report EIO (29)
        (if (i32.eqz (local.get $n)) (then (return (i32.const 29))))
        (local.set $ptr (i32.add (local.get $ptr) (local.get $n)))
        (local.set $len (i32.sub (local.get $len) (local.get $n)))
        (br $next)))
    (i32.const 0))

  (func (export "_start")
    (local $n i32)
    (block $eof
      (loop $next
        (i32.store (global.get $iovec) (global.get $buf))
        (i32.store (i32.add (global.get $iovec) (i32.const 4)) (global.get $buf_len))
        (if (call $fd_read (i32.const 0) (global.get $iovec) (i32.const 1) (global.get $count))
          (then (call $proc_exit (i32.const 1))))
        (local.set $n (i32.load (global.get $count)))
        (br_if $eof (i32.eqz (local.get $n)))
        (call $upper (global.get $buf) (local.get $n))
        (if (call $write_all (global.get $buf) (local.get $n))
          (then (call $proc_exit (i32.const 1))))
        (br $next)))))
