{{/* The Secrets whose change must restart berth (it reads them at start-up). */}}
{{- define "berth.restartSecrets" -}}
{{- if and .Values.tokenKey.value (not .Values.tokenKey.existingSecret) }}
---
apiVersion: v1
kind: Secret
metadata:
  name: {{ include "berth.fullname" . }}-token
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "berth.labels" . | nindent 4 }}
type: Opaque
data:
  token.key: {{ .Values.tokenKey.value | b64enc | quote }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
---
apiVersion: v1
kind: Secret
metadata:
  name: {{ include "berth.fullname" . }}-tls
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "berth.labels" . | nindent 4 }}
type: kubernetes.io/tls
data:
  tls.crt: {{ .Values.tls.cert | b64enc | quote }}
  tls.key: {{ .Values.tls.key | b64enc | quote }}
{{- end }}
{{- if include "berth.upstreamSecretNeeded" . }}
---
apiVersion: v1
kind: Secret
metadata:
  name: {{ include "berth.upstreamSecret" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "berth.labels" . | nindent 4 }}
type: Opaque
data:
  {{- range .Values.config.upstreams }}
  {{- if and .credentials .credentials.password }}
  {{ include "berth.credentialKey" .namespace }}: {{ .credentials.password | b64enc | quote }}
  {{- end }}
  {{- end }}
{{- end }}
{{- end }}
