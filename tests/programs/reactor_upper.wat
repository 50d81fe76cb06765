;; reactor_upper.wat: the WASM worker (reactor) ABI by hand. spear_alloc hands out one scratch
;; area at offset 1024 (growing memory to fit); spear_handle upper-cases ASCII letters in place
;; and returns (len << 32) | ptr.
(module
  (memory (export "memory") 1)
  (func (export "spear_alloc") (param $len i32) (result i32)
    (local $need i32)
    ;; pages needed for 1024 + len bytes, minus the pages there are
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
  (func (export "spear_handle") (param $ptr i32) (param $len i32) (result i64)
    (local $i i32)
    (local $c i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (local.set $c (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
        (if (i32.and (i32.ge_u (local.get $c) (i32.const 97)) (i32.le_u (local.get $c) (i32.const 122)))
          (then
            (i32.store8 (i32.add (local.get $ptr) (local.get $i))
                        (i32.sub (local.get $c) (i32.const 32)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $len)) (i64.const 32))
            (i64.extend_i32_u (local.get $ptr)))))
