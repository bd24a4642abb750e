# Augments http1.py when Cython compiles it (setup.py): the readers as extension types with
# typed attributes, so their llhttp callbacks touch a C struct. http1.py stays plain Python.

cdef class _Reader:
    cdef public object events
    cdef public Py_ssize_t max_head_bytes
    cdef public Py_ssize_t max_fields
    cdef public list _headers
    cdef public Py_ssize_t _head_bytes
    cdef public bint _in_head
    cdef public Py_ssize_t _pending_head_bytes
    cdef public bint failed
    cdef public Py_ssize_t messages_completed
    cdef public object _parser

cdef class RequestReader(_Reader):
    cdef public bytes _url
    cdef public object _not_upgraded
    cdef public bint _framing_only

cdef class ResponseReader(_Reader):
    cdef public bint _head_request
    cdef public object _head_buffer
    cdef public bint _interim
    cdef public bint _reading_until_close
    cdef public bint dirty
